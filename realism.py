"""
Are the synthetic anomalies like real lesions? Real lesions (a dataset with masks) against every synthesis mode,
like with like, with per-instance descriptors and two-sample tests. The measurement of the method's central claim.

    python realism.py --ckpt runs/taef2-busi-k1-s0/run.pt runs/taef2-busi-k1-s1/run.pt runs/taef2-busi-k1-s2/run.pt \
        --data busi --data-root ../shared/data --out runs/realism-busi

The groups (every image goes through the same VAE round trip, so the only difference left is the anomaly itself,
not the decoder's fingerprint):
    real          the test split's anomalous images with a non-empty mask: decode(encode(x))
    deviation     the method: z_anom = z_n + C (1 - m) eta_theta(x_t, t), decoded (deviation.synthesise_latent)
    latent-noise  its control, sharing every draw (mask, C, noise, step): z_n + C (1 - m) n, decoded
    mediclip      MediCLIP's pixel tasks (pixel_tasks.py), then decode(encode(.))
    pixel-noise   Gaussian noise in a soft blob, then decode(encode(.))
The synthetic ones are made on every normal image of the train pool (not only the k shots), N per mode, with the
checkpoint's eta_theta, latent statistics, C range and masks drawn as in training.

The protocol: the real lesions are split once, by SPLIT_SEED, into a development half ("dev") and a held half
("held"). Tune on dev only (`--halves dev` never reads the held half's images); report held.

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
Each seed (one per checkpoint, --seeds at least) draws its own synthesis and folds; mean and std over the seeds.
Reference: the same tests between the real dev and held halves (what "indistinguishable" measures as).

writes DIR/realism.json, DIR/realism.md (the table) and DIR/realism.png (real lesions beside each mode's anomalies:
fixed FIG_CROP-px windows of the 'S'-px images, one scale for all, with and without the mask's outline).
"""
import argparse
import hashlib
import inspect
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.stats import wasserstein_distance

import data
import deviation
import encode
import pixel_tasks
import synthesise
from runfiles import check_writable, load_checkpoint, pick_device, read_cache, write_json

MODES = ("deviation", "latent-noise", "mediclip", "pixel-noise")
DESCRIPTORS = ("contrast", "texture", "sharpness", "slope", "area", "compactness", "pos_y", "pos_x", "intensity",
               "saturation")
SPLIT_SEED = 0     # the one split of the real lesions into dev and held halves; never change it after tuning
MIN_AREA = 16      # px: smaller masks (a JPEG speck, an empty MediCLIP draw) are no lesion to describe
RING_MIN = 3       # px: the narrowest ring around a lesion
CROP, MARGIN = 64, 0.5      # the CNN's crops: side = (1 + 2 MARGIN) x the lesion's larger side, resized to CROP
FIG_CROP, FIG_COLS = 112, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Real lesions against every synthesis mode: descriptors, two-sample "
                                "tests, a figure.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--ckpt", nargs="+", required=True, help="train.py checkpoints: VAE, eta_theta, settings; "
                   "several are the seeds of the spread")
    p.add_argument("--data", default=None, help="dataset with lesion masks (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="folder that holds the datasets (default: the checkpoint's)")
    p.add_argument("--halves", nargs="+", default=["dev", "held"], choices=["dev", "held"],
                   help="which halves of the real lesions to read: tune with 'dev' alone, report both")
    # synthesis (default: as the checkpoint trained)
    p.add_argument("--n", type=int, default=160, help="synthetic anomalies per mode and seed")
    p.add_argument("--seeds", type=int, default=3, help="seeds (checkpoints are used in turn)")
    p.add_argument("--C", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="override the C range")
    p.add_argument("--t-min", type=int, default=0, help="least step t of the masked forward the synthesis draws "
                   "(train.py: 0, every step)")
    p.add_argument("--synth-mask", default=None, choices=["blobs", "patches"], help="override the mask shapes")
    p.add_argument("--grey", default=None, choices=["decode", "off"],
                   help="override train.py --grey: keep grey images' latent anomalies grey (deviation.keep_grey)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="synthesis modes to measure")
    # run
    p.add_argument("--cache", default=None, help="folder to keep the real lesions' descriptors and crops in "
                   "(their VAE round trip takes minutes on a CPU)")
    p.add_argument("--out", required=True, help="folder for realism.json, realism.md and realism.png")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    return p.parse_args(argv)


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


# ---------------------------------------------------------------------------------------------- the groups
@torch.no_grad()
def round_trip(vae, x, batch=16):
    """decode(encode(x)) in batches: what every group goes through."""
    return torch.cat([encode.vae_decode(vae, encode.vae_encode(vae, xb)) for xb in x.split(batch)])


def describe_real(vae, images, masks, cfg, cache, device):
    """The real lesions' descriptors, crops and first figure tiles, after the round trip; kept in --cache, keyed by
    the pixels, the VAE and this file, since the round trip of hundreds of images takes minutes on a CPU."""
    h = hashlib.sha256(images.numpy().tobytes() + masks.numpy().tobytes())
    code = "".join(inspect.getsource(f) for f in (describe, ring_and_band, perimeter, box_slope, crop_around,
                                                     round_trip, encode.vae_encode, encode.vae_decode))
    h.update(repr((cfg["vae"], cfg["vae_weights"], cfg.get("vae_random"), DESCRIPTORS, MIN_AREA, RING_MIN, CROP,
                   MARGIN, FIG_COLS)).encode() + code.encode())
    path = cache and os.path.join(cache, f"real-{h.hexdigest()[:20]}.pt")
    r = read_cache(path)
    if r:
        return dict(r, X=r["X"].numpy(), crops=r["crops"].numpy())
    images, masks = keep_lesions(round_trip(vae, images.to(device)).cpu(), masks)
    X, crops = describe_group(images, masks)
    r = dict(X=torch.from_numpy(X), crops=crops, images=images[:FIG_COLS], masks=masks[:FIG_COLS])
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(r, path)
    return dict(r, X=X, crops=crops.numpy())


def split_halves(names, seed=SPLIT_SEED):
    """The fixed split of the real lesions (by name, so it does not depend on the order of the listing)."""
    order = np.random.default_rng(seed).permutation(len(names))
    ranked = sorted(names)
    held = {ranked[i] for i in order[len(names) // 2:]}
    return [n for n in names if n not in held], [n for n in names if n in held]


def load_real(name, root, halves, size):
    """The anomalous test images that have a mask, split into halves; only the halves asked for are read."""
    recs = [r for r in data.load_split(name, root, "test") if r["label"] == 1 and data.has_mask(r)]
    if not recs:
        raise data.DataError(f"{os.path.join(root, name)}: no anomalous test image with a mask: realism needs "
                             f"real lesion masks (busi has them)")
    dev, held = split_halves([r["name"] for r in recs])
    by_name = {r["name"]: r for r in recs}
    out = {}
    for half, names in (("dev", dev), ("held", held)):
        if half in halves:
            out[half] = data.load_images([by_name[n] for n in names], size)
    return out, dict(n_dev=len(dev), n_held=len(held),
                     dev_sha256=hashlib.sha256("\n".join(sorted(dev)).encode()).hexdigest()[:16])


def keep_lesions(images, masks):
    """Drop the instances whose mask has fewer than MIN_AREA pixels."""
    keep = masks.flatten(1).sum(1) >= MIN_AREA
    return images[keep], masks[keep]


@torch.no_grad()
def synthesise_modes(ckpt, vae, pool, n, seed, settings, modes, device):
    """n anomalies of each mode on the pool's normal images (pool[i % len(pool)]): {mode: (images, masks)}, all
    decoded by the VAE. The latent modes share every draw; the pool is encoded (and grey round-tripped) once."""
    cfg, groups = ckpt["config"], {}
    eta, _, mean, std = synthesise.load_trainables(ckpt, device)
    x, idx = pool.to(device), torch.arange(n) % len(pool)
    z_pool = (encode.encode_latents(vae, x) - mean) / std                                     # (P, c, h, w)
    z_n = z_pool[idx]                                                                         # (n, c, h, w)
    gen = torch.Generator().manual_seed(seed)
    draws = deviation.sample_synthesis(z_n, deviation.foreground(x, z_n.shape[-2:])[idx], settings["C"],
                                       settings["mask"], gen, settings["t_min"])
    grey = encode.grey_for(settings["grey"], cfg["vae"], vae, x, mean, std)
    base = None if grey is None else grey(z_pool)[idx]                                        # R(z_n), once
    decode = lambda zz: torch.cat([encode.vae_decode(vae, zb * std + mean) for zb in zz.split(16)])
    mask_img = F.interpolate(1 - draws["m"], size=x.shape[-2:], mode="nearest").cpu()        # (n, 1, S, S)
    for mode, e in (("deviation", eta), ("latent-noise", None)):
        if mode in modes:
            z_a = deviation.synthesise_latent(z_n, draws, e, deviation.cosine_abar().to(device), grey=grey,
                                              grey_base=base)[0]
            groups[mode] = keep_lesions(decode(z_a).cpu(), mask_img)   # DeCo-Diff patches may corrupt nothing
    for mode in ("mediclip", "pixel-noise"):
        if mode in modes:
            # MediCLIP draws the identity task a sixth of the time: draw extra, keep the first n that changed anything
            images, masks = keep_lesions(*pixel_tasks.build_bank(pool, 2 * n, mode, seed))
            groups[mode] = round_trip(vae, images[:n].to(device)).cpu(), masks[:n]
    return groups


# ---------------------------------------------------------------------------------------------- the figure
def figure_tile(image, mask, outline):
    """A FIG_CROP-px window of image centred on the lesion's centroid (zero padded), at the image's own scale."""
    ys, xs = np.nonzero(mask[0].numpy() > 0.5)
    cy, cx, h = int(ys.mean()), int(xs.mean()), FIG_CROP // 2
    pad = lambda t: F.pad(t, (h, h, h, h))
    tile = pad(synthesise.outline(image, mask[0]) if outline else image)[:, cy:cy + FIG_CROP, cx:cx + FIG_CROP]
    return tile


def write_figure(path, rows):
    """rows: [(label, images, masks)] -> per group a row of crops and the same crops with the mask's outline."""
    strips, labels = [], []
    for label, images, masks in rows:
        k = min(FIG_COLS, len(images))
        for outline in (False, True):
            tiles = [figure_tile(images[i], masks[i], outline) for i in range(k)]
            tiles += [torch.ones(3, FIG_CROP, FIG_CROP)] * (FIG_COLS - k)
            strips.append(torch.cat(tiles, dim=2))
            labels.append(label + (" (outline)" if outline else ""))
    grid = (torch.cat(strips, dim=1).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    left = Image.new("RGB", (120, grid.shape[0]), (255, 255, 255))
    for i, label in enumerate(labels):
        ImageDraw.Draw(left).text((4, i * FIG_CROP + FIG_CROP // 2 - 6), label, fill=(0, 0, 0))
    Image.fromarray(np.concatenate([np.asarray(left), grid], axis=1)).save(path)


# ---------------------------------------------------------------------------------------------- report
def mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def summarise(per_seed, real, halves):
    """per_seed: [{half: {mode: {"X", "sat", "auc_d", "auc_c", "w1"}}}] -> realism.json's halves."""
    out = {}
    for half in halves:
        X_real = real[half]["X"]
        block = {"real": dict(n=len(X_real), saturation=mean_std([X_real[:, -1].mean()]),
                              descriptors={d: mean_std(X_real[:, j]) for j, d in enumerate(DESCRIPTORS)})}
        for mode in [m for m in MODES if m in per_seed[0][half]]:
            runs = [s[half][mode] for s in per_seed]
            X = np.concatenate([r["X"] for r in runs])
            block[mode] = dict(n=int(np.mean([len(r["X"]) for r in runs])),
                               saturation=mean_std([r["X"][:, -1].mean() for r in runs]),
                               c2st_auc_descriptors=mean_std([r["auc_d"] for r in runs]),
                               c2st_auc_crops=mean_std([r["auc_c"] for r in runs]),
                               w1={d: mean_std([r["w1"][d] for r in runs]) for d in DESCRIPTORS},
                               descriptors={d: mean_std(X[:, j]) for j, d in enumerate(DESCRIPTORS)})
        out[half] = block
    return out


def table(report, half):
    """The Markdown table of one half: saturation, both C2ST AUCs, and the w1 of every descriptor."""
    b = report[half]
    f = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    lines = [f"| {half} half | n | saturation | C2ST AUC, descriptors | C2ST AUC, crops | " +
             " | ".join(f"w1 {d}" for d in DESCRIPTORS) + " |", "|" + "---|" * (5 + len(DESCRIPTORS))]
    lines.append(f"| real | {b['real']['n']} | {b['real']['saturation']['mean']:.3f} | - | - | " +
                 " | ".join("-" for _ in DESCRIPTORS) + " |")
    for mode in [m for m in MODES if m in b]:
        m = b[mode]
        lines.append(f"| {mode} | {m['n']} | {f(m['saturation'])} | {f(m['c2st_auc_descriptors'])} | "
                     f"{f(m['c2st_auc_crops'])} | " + " | ".join(f"{m['w1'][d]['mean']:.2f}" for d in DESCRIPTORS)
                     + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(args):
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 2 or args.seeds < 1:
        raise ValueError(f"--n must be >= 2 and --seeds >= 1, got {args.n} and {args.seeds}")
    check_writable(args.out, "--out")
    ckpts = [load_checkpoint(p) for p in args.ckpt]
    cfg, device = ckpts[0]["config"], pick_device(args.device)
    name, root, S = args.data or cfg["data"], args.data_root or cfg["data_root"], cfg["image_size"]
    for p, c in zip(args.ckpt[1:], ckpts[1:]):
        if (c["config"]["vae"], c["config"]["image_size"]) != (cfg["vae"], S):
            raise ValueError(f"{p}: VAE or image size differs from {args.ckpt[0]}'s; the seeds must share them")
    settings = dict(C=list(args.C or cfg["C"]), mask=args.synth_mask or cfg["synth_mask"],
                    grey=args.grey or cfg.get("grey", "off"),
                    t_min=args.t_min)
    warnings = [w for c, p in zip(ckpts, args.ckpt) for w in synthesise.checkpoint_warnings(c["config"], p)]
    trained = dict(C=list(cfg["C"]), mask=cfg["synth_mask"], grey=cfg.get("grey", "off"), t_min=0)
    if settings != trained:   # e.g. --grey decode on a checkpoint from before train.py had --grey
        warnings.append("synthesis settings differ from those the checkpoint trained with: " + ", ".join(
            f"{k} {trained[k]} -> {v}" for k, v in settings.items() if trained[k] != v))

    # the real lesions and the normal pool, every image through the VAE round trip
    vae = encode.load_vae(cfg["vae"], cfg["vae_weights"], cfg["random_init"]).to(device)
    real_images, split = load_real(name, root, args.halves, S)
    pool, _ = data.load_images([r for r in data.load_split(name, root, "train") if r["label"] == 0], S)
    real = {half: describe_real(vae, images, masks, cfg, args.cache, device)
            for half, (images, masks) in real_images.items()}
    counts = ", ".join(f"{h} {len(r['X'])}" for h, r in real.items())
    print(f"real lesions: {counts}; normal pool {len(pool)}; "
          f"{time.time() - t0:.0f} s")

    per_seed, figure = [], None
    for seed in range(max(args.seeds, len(ckpts))):
        groups = synthesise_modes(ckpts[seed % len(ckpts)], vae, pool, args.n, seed, settings, args.modes, device)
        figure = figure or [(mode, g[0][:FIG_COLS], g[1][:FIG_COLS]) for mode, g in groups.items()]
        runs = {h: {} for h in real}
        for mode, (images, masks) in groups.items():
            X, crops = describe_group(images, masks)
            for half, r in real.items():
                runs[half][mode] = dict(X=X, w1=w1(r["X"], X), auc_d=c2st(r["X"], X, forest, seed),
                                        auc_c=c2st(r["crops"], crops.numpy(), cnn, seed))
            print(f"seed {seed} {mode:13s} " + "  ".join(
                f"{h}: AUC descriptors {runs[h][mode]['auc_d']:.3f} crops {runs[h][mode]['auc_c']:.3f}"
                for h in real) + f"  ({time.time() - t0:.0f} s)")
        per_seed.append(runs)

    report = dict(summarise(per_seed, real, list(real)), data=name, data_root=os.path.abspath(root), vae=cfg["vae"],
                  image_size=S, checkpoints=[os.path.abspath(p) for p in args.ckpt], seeds=len(per_seed), n=args.n,
                  settings=settings, split=dict(seed=SPLIT_SEED, **split), descriptors=list(DESCRIPTORS),
                  definitions=__doc__[__doc__.index("Per instance"):__doc__.index("writes DIR")].strip())
    if len(real) == 2:  # what "indistinguishable" measures as: the two real halves against each other
        report["reference_real_dev_vs_held"] = dict(
            c2st_auc_descriptors=mean_std([c2st(real["dev"]["X"], real["held"]["X"], forest, s)
                                           for s in range(len(per_seed))]),
            c2st_auc_crops=mean_std([c2st(real["dev"]["crops"], real["held"]["crops"], cnn, s)
                                     for s in range(len(per_seed))]))
    report["warnings"] = warnings
    report["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    half = "held" if "held" in real else "dev"
    write_figure(os.path.join(args.out, "realism.png"),
                 [("real (" + half + ")", real[half]["images"], real[half]["masks"])] + figure)
    md = "\n\n".join(table(report, h) for h in real)
    with open(os.path.join(args.out, "realism.md"), "w") as f:
        f.write(md + "\n")
    write_json(report, os.path.join(args.out, "realism.json"))
    for w in warnings:
        print(f"WARNING: {w}")
    print(md)
    print(f"wrote {args.out}/realism.json, realism.md, realism.png ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    try:
        main(parse_args())
    except (data.DataError, encode.WeightsUnavailable, ValueError) as e:
        sys.exit(f"error: {e}")
