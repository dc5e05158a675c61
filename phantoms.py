"""
Synthetic phantoms: the in-memory `--data synthetic` set that needs no download, deterministic from the seed.
A normal slice is an organ with a bright rim, one or two darker inner structures and smooth texture; an anomalous
one adds a smooth irregular hyper- or hypo-intense blob, whose mask is exactly the pixels it changed.

    import phantoms
    image, r_organ = phantoms.phantom(np.random.default_rng(0))       # (224, 224) float32 in [0, 1]
    image, mask = phantoms.add_lesion(rng, image, r_organ, hyper=True)
    train = phantoms.synthetic_split("train", seed=0, record=data._record)   # as data.load_split("synthetic", ...)
"""
import numpy as np
from scipy.ndimage import gaussian_filter, label as cc_label


def ellipse_r(yy, xx, cy, cx, a, b, t):
    """Normalised elliptic radius: < 1 inside the ellipse."""
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def soft(r, width):
    """Soft inside-indicator of r < 1 (sigmoid edge), like partial-volume blur at organ borders."""
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / width, -50, 50)))


def smooth_noise(rng, n, sigma):
    z = gaussian_filter(rng.standard_normal((n, n)), sigma)
    return z / z.std()


def phantom(rng, n=224):
    """One normal slice: organ with a bright rim, 1-2 darker inner structures, smooth texture."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cy, cx = n / 2 + rng.uniform(-10, 10, 2)
    a, b = n * rng.uniform(0.30, 0.40), n * rng.uniform(0.24, 0.32)
    t = rng.uniform(-0.35, 0.35)
    r = ellipse_r(yy, xx, cy, cx, a, b, t)
    organ = soft(r, 0.02)
    img = organ * (rng.uniform(0.45, 0.6) + 0.04 * smooth_noise(rng, n, 4) + 0.05 * smooth_noise(rng, n, 20))
    img += rng.uniform(0.2, 0.35) * (soft(r / 1.07, 0.02) - organ)  # capsule / skull-like rim
    for _ in range(rng.integers(1, 3)):
        oy, ox = rng.uniform(-0.3, 0.3, 2) * (b, a)
        ri = ellipse_r(yy, xx, cy + oy, cx + ox, a * rng.uniform(0.1, 0.2), b * rng.uniform(0.1, 0.2), t)
        img -= rng.uniform(0.15, 0.25) * soft(ri, 0.05) * organ
    img[img < 1e-3] = 0  # sigmoid tails would leave 1e-20 haze: make the background truly black
    return np.clip(img, 0, 1).astype(np.float32), r


def add_lesion(rng, img, r_organ, hyper):
    """Paint a smooth irregular blob inside the organ; the mask is exactly the changed pixels."""
    n = img.shape[0]
    ys, xs = np.nonzero(r_organ < 0.6)
    i = rng.integers(len(ys))
    yy, xx = np.mgrid[0:n, 0:n]
    field = 1 - np.hypot(yy - ys[i], xx - xs[i]) / rng.uniform(8, 18) + 0.25 * smooth_noise(rng, n, 3)
    comps, _ = cc_label((field > 0) & (r_organ < 0.9))
    blob = comps == np.bincount(comps.ravel()[comps.ravel() > 0]).argmax()  # one blob, no islands
    amp = rng.uniform(0.15, 0.3) * (1 if hyper else -1)
    delta = amp * (0.5 + np.clip(field, 0, 0.5)) * blob  # at least half strength, so every blob pixel changes
    out = np.clip(img + delta, 0, 1).astype(np.float32)
    return out, out != img


def synthetic_split(split, seed, record):
    """The records of a split (16 normal train slices; 12 normal and 12 anomalous test slices), made by record."""
    # separate seed-derived streams so the test split never repeats a training phantom
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    if split == "train":
        return [record(f"train/normal_{i:02d}", 0, "normal", image=phantom(rng)[0]) for i in range(16)]
    recs = [record(f"test/normal_{i:02d}", 0, "normal", image=phantom(rng)[0]) for i in range(12)]
    for i in range(12):
        cls = "hyper" if i % 2 == 0 else "hypo"
        img, mask = add_lesion(rng, *phantom(rng), hyper=cls == "hyper")
        recs.append(record(f"test/{cls}_{i:02d}", 1, cls, image=img, mask=mask))
    return recs
