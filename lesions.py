"""
A lesion described from its image and mask alone, and two-sample tests that tell one set of lesions from another:
what realism.py uses to compare synthetic anomalies with real lesions (which have no normal twin).

Per instance (an image and its mask; the real lesions have no normal twin), on the grey image g = mean(R, G, B):
    contrast     mean(g) inside - mean(g) in the ring around it (ring: out to half the lesion's equivalent radius,
                 at least RING_MIN px)
    texture      log(std(g) inside / std(g) in the ring)
    sharpness    mean |grad g| over the outline's band (pixels within 1.5 px of it, either side): a step edge of
                 contrast c gives about c / 2 (central differences), a blurred edge less
    slope        spectrum slope (log power against log frequency) of g in the lesion's bounding box, Hann-windowed,
                 resampled to 32 px: about 0 for white noise, more negative for smooth structure
    area         the mask's share of the image
    compactness  4 pi area / perimeter^2 (perimeter: pi/4 times the pixel edges crossed): 1 for a disc, less for a
                 ring or a ragged outline
    pos_y, pos_x the lesion's centroid in the anatomy's bounding box (anatomy: grey > 0.1 of the image's max), 0..1
    intensity    mean(g) inside
    saturation   mean over the lesion's pixels of max(R, G, B) - min(R, G, B), images on [0, 1]: 0 for grey
The tests, real vs each mode, on each half: per-descriptor 1-Wasserstein distance (w1, in units of the real
lesions' std of that descriptor), and classifier two-sample tests (C2ST: a cross-validated classifier told to
separate real from synthetic; out-of-fold AUC, 0.5 = indistinguishable, 1 = told apart every time): a random forest
on the descriptors, and a small CNN on CROP x CROP crops centred on the lesion with a margin of MARGIN x its size.

    import lesions
    X, crops = lesions.describe_group(images, masks)          # (N, len(DESCRIPTORS)), (N, 3, CROP, CROP)
    auc = lesions.c2st(X_real, X_synth, lesions.forest, seed=0)   # or crops with lesions.cnn
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import wasserstein_distance

import synthesise

DESCRIPTORS = ("contrast", "texture", "sharpness", "slope", "area", "compactness", "pos_y", "pos_x", "intensity",
               "saturation")
RING_MIN = 3       # px: the narrowest ring around a lesion
CROP, MARGIN = 64, 0.5      # the CNN's crops: side = (1 + 2 MARGIN) x the lesion's larger side, resized to CROP


# ---------------------------------------------------------------------------------------------- descriptors
def ring_and_band(mask):
    """The ring around a lesion (out to half its equivalent radius) and its outline's band (within 1.5 px)."""
    out = ndimage.distance_transform_edt(~mask)                       # distance of outside pixels to the lesion
    inside = ndimage.distance_transform_edt(mask)                     # distance of inside pixels to the outside
    width = max(RING_MIN, 0.5 * np.sqrt(mask.sum() / np.pi))
    return (out > 0) & (out <= width), ((out > 0) & (out <= 1.5)) | ((inside > 0) & (inside <= 1.5))


def perimeter(mask):
    """Pixel edges between inside and outside (zero padded), times pi/4: unbiased for a disc's outline."""
    m = np.pad(mask, 1).astype(np.int8)
    return np.pi / 4 * (np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum())


def box_slope(g, mask, side=32):
    """Spectrum slope of g in the lesion's square bounding box, mean removed, Hann-windowed, resampled to side px."""
    ys, xs = np.nonzero(mask)
    cy, cx, half = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2, max(np.ptp(ys), np.ptp(xs), 8) / 2 + 1
    y0, y1 = int(max(0, cy - half)), int(min(g.shape[0], cy + half + 1))
    x0, x1 = int(max(0, cx - half)), int(min(g.shape[1], cx + half + 1))
    box = torch.from_numpy(np.ascontiguousarray(g[y0:y1, x0:x1]))[None, None].double()
    box = F.interpolate(box, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    hann = torch.hann_window(side, periodic=False, dtype=torch.float64)
    return float(synthesise.spectrum_slope((box - box.mean()) * hann[:, None] * hann[None, :])[0])


def describe(image, mask):
    """image (3, S, S) in [0, 1], mask (S, S) bool -> the DESCRIPTORS of one lesion, as a float array."""
    rgb = image.numpy().astype(np.float64)
    g = rgb.mean(0)
    ring, band = ring_and_band(mask)
    gy, gx = np.gradient(g)
    anatomy = g > 0.1 * g.max()
    ays, axs = np.nonzero(anatomy) if anatomy.any() else np.nonzero(np.ones_like(mask))
    ys, xs = np.nonzero(mask)
    inside, around = g[mask], g[ring] if ring.any() else g[~mask]
    return np.array([
        inside.mean() - around.mean(),
        np.log((inside.std() + 1e-3) / (around.std() + 1e-3)),
        np.hypot(gy, gx)[band].mean(),
        box_slope(g, mask),
        mask.mean(),
        4 * np.pi * mask.sum() / perimeter(mask) ** 2,
        (ys.mean() - ays.min()) / max(np.ptp(ays), 1),
        (xs.mean() - axs.min()) / max(np.ptp(axs), 1),
        inside.mean(),
        (rgb.max(0) - rgb.min(0))[mask].mean(),
    ])


def crop_around(image, mask, size=CROP, margin=MARGIN):
    """A square crop centred on the lesion's bounding box, (1 + 2 margin) x its larger side (zero padded past the
    image), resized to size x size. (3, size, size)"""
    ys, xs = np.nonzero(mask)
    side = max(np.ptp(ys) + 1, np.ptp(xs) + 1, 8) * (1 + 2 * margin)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    S = image.shape[-1]
    # affine_grid's coordinates span [-1, 1] over the image: the crop's centre and scale in those units
    theta = torch.tensor([[[side / S, 0, 2 * cx / S - 1], [0, side / S, 2 * cy / S - 1]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
    return F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def describe_group(images, masks):
    """(N, 3, S, S), (N, 1, S, S) -> descriptors (N, D) and CNN crops (N, 3, CROP, CROP)."""
    ms = [m[0].numpy() > 0.5 for m in masks]
    return (np.stack([describe(x, m) for x, m in zip(images, ms)]),
            torch.stack([crop_around(x, m) for x, m in zip(images, ms)]))


# ---------------------------------------------------------------------------------------------- two-sample tests
def c2st(a, b, fit_predict, seed, folds=5):
    """Classifier two-sample test: out-of-fold AUC of telling a from b (equal sizes: the larger is subsampled)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
    X, y = np.concatenate([a, b]), np.r_[np.zeros(n), np.ones(n)]
    p = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        p[test] = fit_predict(X[train], y[train], X[test], seed)
    return float(roc_auc_score(y, p))


def forest(X, y, X_test, seed):
    """A random forest on the descriptors: P(synthetic) of X_test."""
    from sklearn.ensemble import RandomForestClassifier
    clf = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
    return clf.fit(X, y).predict_proba(X_test)[:, 1]


class CropNet(nn.Module):
    """A small CNN on (B, 3, CROP, CROP) crops -> one logit: real (0) or synthetic (1)."""

    def __init__(self, width=16):
        super().__init__()
        conv = lambda i, o: [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        self.net = nn.Sequential(*conv(3, width), *conv(width, 2 * width), *conv(2 * width, 4 * width),
                                 *conv(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4 * width, 1))

    def forward(self, x):
        return self.net(x - 0.5)[:, 0]


def cnn(X, y, X_test, seed, epochs=15, batch=32):
    """CropNet trained from scratch (Adam, flips as augmentation) on crops X: P(synthetic) of X_test."""
    torch.manual_seed(seed)
    net, X, y = CropNet(), torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(batch):
            xb = X[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=gen) < 0.5, xb.flip(-1), xb)
            loss = F.binary_cross_entropy_with_logits(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return torch.cat([net(xb).sigmoid() for xb in torch.as_tensor(X_test).split(256)]).numpy()


def w1(real, synth):
    """Per-descriptor 1-Wasserstein distance, in units of the real lesions' std of that descriptor."""
    return {d: float(wasserstein_distance(real[:, j], synth[:, j]) / max(real[:, j].std(), 1e-9))
            for j, d in enumerate(DESCRIPTORS)}
