"""
Pixel-space anomaly synthesis on the k normal shots: the baselines against the learned latent-space anomalies.

MediCLIP (Zhang et al., "MediCLIP: Adapting CLIP for Few-shot Medical Image Anomaly Detection", MICCAI 2024)
trains on normal shots corrupted by one of three tasks, or left as they are, each drawn with probability 0.25:
    cutpaste         a rotated, rescaled patch of another shot pasted through a soft random mask (Li et al. 2021)
    gauss_intensity  a smooth noise texture added through a soft random mask
    source           a mass effect: the inside of a deformed ellipse pushed outward by a radial warp
    identity         nothing
plus the heuristic control pixel_noise: Gaussian noise added through a soft random mask.

Images are CPU float32 tensors (3, S, S) in [0, 1]. Every task returns (out (3, S, S), mask (1, S, S)) where
mask is exactly the set of changed pixels, (out != image).any(0), so labels never claim an unchanged pixel.
All randomness comes from the passed torch.Generator: same seed, bit-identical result.

    import pixel_tasks
    images, masks = pixel_tasks.build_bank(views, n=128, mode="mediclip", seed=0)   # or mode="pixel-noise"
    out, mask = pixel_tasks.synthesise_mediclip(image, others, torch.Generator().manual_seed(0), fg)
"""
import math

import torch
import torch.nn.functional as F

TASKS = ("cutpaste", "gauss_intensity", "source", "identity")   # MediCLIP's tasks, sampled 0.25 each
MODES = ("mediclip", "pixel-noise")
EDGE = 0.02        # soft-edge blur sigma, as a fraction of the side
ALPHA_MIN = 0.05   # alpha below this is set to exactly 0: the blur's far tail would only smear the label
FG_FRAC = 0.1      # foreground: grey level > FG_FRAC * the view's max (scans sit on black backgrounds)


def uniform(gen, lo, hi):
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def smooth_noise(S, gen, cells=8):
    """A smooth random field (S, S) with unit std: Gaussian noise on a coarse grid, upsampled bicubically."""
    f = F.interpolate(torch.randn(1, 1, cells, cells, generator=gen), size=(S, S), mode="bicubic",
                      align_corners=False)[0, 0]
    return f / f.std().clamp_min(1e-6)


def wobble(theta, gen, amp=0.25, harmonics=4):
    """1 + a smooth random function of the angle theta (S, S): a few random harmonics, decaying as 1 / k.
    An outline bent by a function of the angle alone stays star-shaped around its centre, hence connected."""
    k = torch.arange(1, harmonics + 1).float()
    a = amp * torch.randn(harmonics, generator=gen) / k
    phase = 2 * math.pi * torch.rand(harmonics, generator=gen)
    return (1 + (a * torch.cos(k * theta[..., None] + phase)).sum(-1)).clamp(0.3, 1.7)   # (S, S)


def blur(x, sigma):
    """Separable Gaussian blur of x (S, S), zero padded, so that a blob's blur fades to 0 around it."""
    rad = max(1, math.ceil(3 * sigma))
    w = torch.exp(-torch.arange(-rad, rad + 1).float() ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    x = F.conv2d(x[None, None], w.view(1, 1, 1, -1), padding=(0, rad))
    return F.conv2d(x, w.view(1, 1, -1, 1), padding=(rad, 0))[0, 0]


def soft_alpha(shape):
    """bool (S, S) -> alpha (1, S, S): blurred, peak 1, exactly 0 where the blur's tail is below ALPHA_MIN."""
    a = blur(shape.float(), EDGE * shape.shape[-1])
    a = a / a.max().clamp_min(1e-6)
    return torch.where(a < ALPHA_MIN, torch.zeros_like(a), a)[None]


def foreground(image):
    """(3, S, S) -> bool (S, S): the anatomy, i.e. grey level above FG_FRAC of the image's max."""
    grey = image.mean(0)
    return grey > FG_FRAC * grey.max()


def sample_centre(S, gen, fg=None):
    """A pixel (y, x) of fg, or, if fg is None or empty, anywhere at least 10 % of the side from the border."""
    where = fg.nonzero() if fg is not None else torch.empty(0, 2, dtype=torch.long)
    if len(where):
        cy, cx = where[torch.randint(len(where), (1,), generator=gen)][0].tolist()
        return cy, cx
    lo, hi = int(0.1 * S), max(int(0.1 * S) + 1, int(0.9 * S))
    cy, cx = torch.randint(lo, hi, (2,), generator=gen).tolist()
    return cy, cx


def result(out, image):
    """Final clamp, then the exact label: the pixels that differ from the input in any channel."""
    out = out.clamp(0, 1)
    return out, (out != image).any(dim=0, keepdim=True).float()


def pixel_grid(S):
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    return yy, xx   # (S, S) each, pixel coordinates


def to_norm(p, S):
    """Pixel coordinate -> grid_sample's normalised coordinate (align_corners=False: pixel centres)."""
    return (2 * p + 1) / S - 1


# -----------------------------------------------------------------------------
# shapes and tasks

def random_shape(S, gen, fg=None, min_r=0.05, max_r=0.2):
    """One smooth, irregular blob, bool (S, S), centred on the foreground and cut to it; never empty."""
    cy, cx = sample_centre(S, gen, fg)
    r = uniform(gen, min_r, max_r) * S
    yy, xx = pixel_grid(S)
    dy, dx = yy - cy, xx - cx
    blob = (dy ** 2 + dx ** 2).sqrt() < r * wobble(torch.atan2(dy, dx), gen)
    blob[cy, cx] = True
    inside = blob & fg if fg is not None else blob
    return inside if inside.any() else blob


def cutpaste(image, source, gen, fg=None):
    """CutPaste: a rotated, rescaled patch of `source` pasted into `image` through a soft random blob."""
    S = image.shape[-1]
    shape = random_shape(S, gen, fg)
    alpha = soft_alpha(shape)                                             # (1, S, S)
    yy, xx = pixel_grid(S)
    ty, tx = yy[shape].mean(), xx[shape].mean()                           # target: the blob's centroid
    sy, sx = sample_centre(S, gen, foreground(source))                    # a patch of anatomy, not background
    ang, scale = uniform(gen, -math.pi, math.pi), uniform(gen, 0.75, 1.25)
    # theta maps output coords (x, y) to source coords: q = s + A (p - t), with A a rotation over the scale
    A = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) / scale
    t, s = to_norm(torch.stack([tx, ty]), S), to_norm(torch.tensor([sx, sy]).float(), S)
    theta = torch.cat([A, (s - A @ t)[:, None]], dim=1)[None]            # (1, 2, 3)
    grid = F.affine_grid(theta, [1, 3, S, S], align_corners=False)
    warped = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)[0]                        # (3, S, S)
    return result((1 - alpha) * image + alpha * warped, image)


def gauss_intensity(image, gen, fg=None):
    """Gaussian intensity change: a smooth noise texture, amplitude U(0.1, 0.3), added through a soft blob."""
    S = image.shape[-1]
    alpha = soft_alpha(random_shape(S, gen, fg))                          # (1, S, S)
    tex = smooth_noise(S, gen, cells=16)
    tex = tex / tex.abs().max().clamp_min(1e-6) * uniform(gen, 0.1, 0.3)  # (S, S), in [-amp, amp]
    return result(image + alpha * tex, image)                             # same change in all 3 channels (grey)


def source_warp(image, gen, fg=None):
    """MediCLIP's Source task: inside a deformed ellipse, output radius r samples input radius r ** gamma."""
    S = image.shape[-1]
    cy, cx = sample_centre(S, gen, fg)
    a, b = uniform(gen, 0.08, 0.2) * S, uniform(gen, 0.08, 0.2) * S
    phi, gamma = uniform(gen, 0, math.pi), uniform(gen, 1.5, 3)
    yy, xx = pixel_grid(S)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(phi) + dy * math.sin(phi)) / a
    v = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
    r = (u ** 2 + v ** 2).sqrt() / wobble(torch.atan2(v, u), gen, amp=0.15)     # (S, S), outline bent
    inside = r < 1
    # scaling the offset by r ** (gamma - 1) moves radius r to r ** gamma: 0 at the centre, 1 on the edge
    k = torch.where(inside, r.clamp_min(1e-6) ** (gamma - 1), torch.ones_like(r))
    qy, qx = torch.where(inside, cy + dy * k, yy), torch.where(inside, cx + dx * k, xx)
    grid = torch.stack([to_norm(qx, S), to_norm(qy, S)], dim=-1)[None]   # (1, S, S, 2)
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    # bilinear sampling on the identity grid may round; outside the ellipse take the input itself
    return result(torch.where(inside, warped, image), image)


def identity(image):
    return image.clone(), torch.zeros(1, *image.shape[-2:])


def pixel_noise(image, gen, fg=None):
    """The heuristic baseline: per-pixel Gaussian noise, std U(0.1, 0.3), added through a soft blob."""
    S = image.shape[-1]
    alpha = soft_alpha(random_shape(S, gen, fg))                          # (1, S, S)
    noise = torch.randn(1, S, S, generator=gen) * uniform(gen, 0.1, 0.3)  # grey: one noise for all channels
    return result(image + alpha * noise, image)


# -----------------------------------------------------------------------------
# MediCLIP's synthesis and the training bank

def synthesise_mediclip(image, others, gen, fg=None):
    """One or two anomalies (p 0.5 each), each task uniform over TASKS; mask is vs. the original image."""
    out = image
    for _ in range(1 + int(torch.rand(1, generator=gen) < 0.5)):
        task = TASKS[int(torch.randint(len(TASKS), (1,), generator=gen))]
        if task == "cutpaste":
            out = cutpaste(out, others[int(torch.randint(len(others), (1,), generator=gen))], gen, fg)[0]
        elif task == "gauss_intensity":
            out = gauss_intensity(out, gen, fg)[0]
        elif task == "source":
            out = source_warp(out, gen, fg)[0]
        else:
            out = identity(out)[0]
    return result(out, image)


def build_bank(views, n, mode, seed):
    """views (V, 3, S, S) normal -> n synthetic anomalies: images (n, 3, S, S), masks (n, 1, S, S)."""
    if mode not in MODES:
        raise ValueError(f"build_bank: unknown mode {mode!r}; modes: {', '.join(MODES)}")
    gen = torch.Generator().manual_seed(seed)
    views = views.detach().float().cpu()
    fgs = [foreground(v) for v in views]                                 # blobs stay in the anatomy
    images, masks = [], []
    for _ in range(n):
        j = int(torch.randint(len(views), (1,), generator=gen))
        if mode == "mediclip":
            out, mask = synthesise_mediclip(views[j], views, gen, fgs[j])
        else:
            out, mask = pixel_noise(views[j], gen, fgs[j])
        images.append(out)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)
