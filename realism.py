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

Per instance, the descriptors and tests of lesions.py (its docstring defines them): per-descriptor 1-Wasserstein
distance and classifier two-sample tests (random forest on the descriptors, small CNN on crops), real vs each mode.
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
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import deviation
import encode
import lesions
import pixel_tasks
import synthesise
from lesions import DESCRIPTORS, c2st, cnn, describe_group, forest, w1
from runfiles import check_writable, load_checkpoint, pick_device, read_cache, write_json

MODES = ("deviation", "latent-noise", "mediclip", "pixel-noise")
SPLIT_SEED = 0     # the one split of the real lesions into dev and held halves; never change it after tuning
MIN_AREA = 16      # px: smaller masks (a JPEG speck, an empty MediCLIP draw) are no lesion to describe
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
    p.add_argument("--synth-mask", default=None, choices=["lesions", "blobs", "patches"],
                   help="override the mask shapes")
    p.add_argument("--eta-smooth", type=float, default=None, help="override train.py --eta-smooth (latent cells)")
    p.add_argument("--synth-source", default=None, choices=["noise", "tissue"], help="override train.py "
                   "--synth-source")
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


# ---------------------------------------------------------------------------------------------- the groups
@torch.no_grad()
def round_trip(vae, x, batch=16):
    """decode(encode(x)) in batches: what every group goes through."""
    return torch.cat([encode.vae_decode(vae, encode.vae_encode(vae, xb)) for xb in x.split(batch)])


def describe_real(vae, images, masks, cfg, cache, device):
    """The real lesions' descriptors, crops and first figure tiles, after the round trip; kept in --cache, keyed by
    the pixels, the VAE and the descriptor code, since the round trip of hundreds of images takes minutes on a CPU."""
    h = hashlib.sha256(images.numpy().tobytes() + masks.numpy().tobytes())
    code = inspect.getsource(lesions) + "".join(inspect.getsource(f) for f in (round_trip, encode.vae_encode,
                                                                                encode.vae_decode))
    h.update(repr((cfg["vae"], cfg["vae_weights"], cfg.get("vae_random"), MIN_AREA, FIG_COLS)).encode() + code.encode())
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
    draws = deviation.sample_synthesis(z_n, deviation.foreground(x)[idx], settings["C"], settings["mask"], gen,
                                       settings["t_min"], settings["source"], settings["noise"])
    grey = deviation.grey_for(settings["grey"], cfg["vae"], vae, x, mean, std)
    base = None if grey is None else grey(z_pool)[idx]                                        # R(z_n), once
    decode = lambda zz: torch.cat([encode.vae_decode(vae, zb * std + mean) for zb in zz.split(16)])
    mask_img = draws["label"].cpu()                                                           # (n, 1, S, S)
    for mode, e in (("deviation", eta), ("latent-noise", None)):
        if mode in modes:
            z_a = deviation.synthesise_latent(z_n, draws, e, deviation.cosine_abar().to(device), grey=grey,
                                              grey_base=base, smooth=settings["eta_smooth"])[0]
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
        if c["config"].get("eta_noise", "gaussian") != cfg.get("eta_noise", "gaussian"):   # eta reads its own kind
            raise ValueError(f"{p}: eta_theta trained on another --eta-noise than {args.ckpt[0]}'s; the seeds must "
                             f"share it")
    settings = dict(C=list(args.C or cfg["C"]), mask=args.synth_mask or cfg["synth_mask"],
                    grey=args.grey or cfg.get("grey", "off"), t_min=args.t_min,
                    eta_smooth=cfg.get("eta_smooth", 0.0) if args.eta_smooth is None else args.eta_smooth,
                    source=args.synth_source or cfg.get("synth_source", "noise"),
                    noise=cfg.get("eta_noise", "gaussian"))
    warnings = [w for c, p in zip(ckpts, args.ckpt) for w in synthesise.checkpoint_warnings(c["config"], p)]
    trained = dict(C=list(cfg["C"]), mask=cfg["synth_mask"], grey=cfg.get("grey", "off"), t_min=0,
                   eta_smooth=cfg.get("eta_smooth", 0.0), source=cfg.get("synth_source", "noise"),
                   noise=cfg.get("eta_noise", "gaussian"))
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
                  definitions=lesions.__doc__.split("    import lesions")[0].strip())
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
