"""
Look at, and measure, what the synthesis makes: decoded anomaly grids and statistics, from a checkpoint.

The method's anomalies live in latent space and go straight into CLIP's token space (project.py); they are never
decoded during training. Here they are: from the checkpoint come the same shots and views (data.py), the frozen
VAE encoder and decoder, eta_theta, and the synthesis exactly as train.py runs it (deviation.sample_synthesis and
deviation.synthesise_latent: the same masks, the same C range). The latent-noise control shares every draw (mask,
C, noise, step): only eta_theta's prediction is replaced by the Gaussian noise n.

    python synthesise.py --ckpt runs/busi-k1-s0/run.pt [--n 16] [--out DIR]

writes (into --out, default beside the checkpoint)
- synthesis.png: one row per view: normal | learned anomaly | latent-noise control | mask outline |
  |learned - normal| | |control - normal| (both heat maps on the row's common scale), all decoded by the VAE.
- synthesis.json: the statistics below, learned and control side by side (mean and std over the views where
  each is defined, and their number n).
  Every change is measured between decoded images (decode(z_anom) - decode(z_n)), so the decoder's own
  reconstruction error cancels.
  locality          share of the decoded change's energy (sum of squares) inside the mask
  locality_dilated  the same inside the mask dilated by the decoder's reach (decoder_reach_px: the radius that
                    holds 99% of the decoded change of a one-cell latent perturbation, measured on the first view)
  size              mean |change| inside the mask over the standard deviation of the normal image's intensities
  spectrum_slope    slope of log power against log frequency of the latent deviation z_anom - z_n (radially
                    averaged, channels averaged): about 0 for white noise, more negative for smoother structure
  shrink_corr       correlation of eta_pred with -z_n inside the mask: how much of the deviation is the
                    anatomy-shrinking term -k_t z_n of DeCo-Diff's target (learned only)
  token_change_in / _out   1 - cos(P(z_anom), P(z_n)) averaged over the CLIP-token cells inside / outside the mask
                    (cells more than half covered by it), and their ratio: whether the anomaly reaches token space
                    where the label says it is
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import augment
import data
import deviation
import encode
import project
from runfiles import check_writable, load_checkpoint, pick_device, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Decode and measure the synthetic anomalies of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--n", type=int, default=16, help="views to synthesise on (the shots' views, in order)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesis draws (masks, C, noise, steps)")
    p.add_argument("--data-root", default=None, help="folder that holds the datasets (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="folder for synthesis.png and synthesis.json (default: beside --ckpt)")
    p.add_argument("--tile", type=int, default=160, help="side of each image in synthesis.png, px")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the statistics
def dilate(mask, r):
    """(B, 1, H, W) {0, 1} dilated by a disc of radius r px."""
    if r < 1:
        return mask
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= r * r).float()[None, None]
    return (F.conv2d(mask, disc.to(mask), padding=r) > 0).float()


def decoder_reach(vae, z, q=0.99):
    """Radius (px) that holds q of the decoded change's energy when one latent cell (the centre) moves by 1."""
    h, w = z.shape[-2:]
    dz = torch.zeros_like(z[:1])
    dz[..., h // 2, w // 2] = 1.0
    change = (encode.vae_decode(vae, z[:1] + dz) - encode.vae_decode(vae, z[:1])).pow(2).sum(1)[0]   # (H, W)
    H, W = change.shape
    cy, cx = (h // 2 + 0.5) * H / h, (w // 2 + 0.5) * W / w
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    dist, energy = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt().flatten(), change.flatten()
    order = dist.argsort()
    cum = energy[order].cumsum(0) / energy.sum().clamp_min(1e-12)
    return int(torch.ceil(dist[order][int((cum < q).sum().clamp(max=len(cum) - 1))]))


def spectrum_slope(d):
    """Slope of log radial power against log frequency of d (B, c, h, w), channels averaged. (B,)"""
    p = torch.fft.fftshift(torch.fft.fft2(d.double()).abs() ** 2, dim=(-2, -1)).mean(1)           # (B, h, w)
    h, w = p.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    k = (yy ** 2 + xx ** 2).sqrt().round().long().flatten()
    ks = torch.arange(1, min(h, w) // 2)
    radial = torch.stack([torch.stack([pb.flatten()[k == r].mean() for r in ks]) for pb in p])  # (B, K)
    x, y = ks.double().log(), radial.clamp_min(1e-30).log()
    x = x - x.mean()
    return ((y - y.mean(1, keepdim=True)) * x).sum(1) / (x ** 2).sum()


def masked_corr(a, b, inside):
    """Pearson correlation of a and b over the elements where inside is 1, per image. (B,)"""
    out = []
    for ai, bi, mi in zip(a, b, inside.expand_as(a).bool()):
        x, y = ai[mi].double(), bi[mi].double()
        x, y = x - x.mean(), y - y.mean()
        out.append((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))
    return torch.stack(out)


def token_change(proj, z_anom, z_n, mask_img):
    """1 - cos between P(z_anom) and P(z_n) per token, averaged over the layers: over the cells inside the mask
    (more than half covered) and outside it. Two (B,) tensors."""
    change = torch.stack([1 - F.cosine_similarity(a, b, dim=1) for a, b in zip(proj(z_anom), proj(z_n))]).mean(0)
    inside = F.adaptive_avg_pool2d(mask_img, change.shape[-2:])[:, 0] > 0.5                    # (B, H, W)
    mean = lambda sel: torch.stack([c[s].mean() if s.any() else c.new_tensor(float("nan"))
                                    for c, s in zip(change, sel)])
    return mean(inside), mean(~inside)


def measure(x0, x_anom, mask_img, reach, z_n, z_anom, proj):
    """The statistics of one kind of anomaly (learned or control) on a batch of views, each (B,)."""
    change = (x_anom - x0).mean(1, keepdim=True)                                               # (B, 1, H, W)
    energy = change.pow(2)
    share = lambda m: (energy * m).sum((1, 2, 3)) / energy.sum((1, 2, 3)).clamp_min(1e-12)
    size = (change.abs() * mask_img).sum((1, 2, 3)) / mask_img.sum((1, 2, 3)).clamp_min(1)
    tin, tout = token_change(proj, z_anom, z_n, mask_img)
    return dict(locality=share(mask_img), locality_dilated=share(dilate(mask_img, reach)),
                size=size / x0.mean(1).flatten(1).std(1).clamp_min(1e-6), spectrum_slope=spectrum_slope(z_anom - z_n),
                token_change_in=tin, token_change_out=tout, token_change_ratio=tin / tout.clamp_min(1e-12))


def summarise(stats):
    """Mean and std (ddof 1) of each statistic over the n images where it is defined (token_change_in is NaN for
    an image whose mask covers no token cell by half): std 0 from fewer than two, mean NaN from none."""
    out = {}
    for k, v in stats.items():
        x = v.numpy()
        x = x[~np.isnan(x)]
        out[k] = dict(mean=float(x.mean()) if len(x) else float("nan"),
                      std=float(x.std(ddof=1)) if len(x) > 1 else 0.0, n=len(x))
    return out


# ---------------------------------------------------------------------------------------------- the figure
def outline(image, mask):
    """The image (3, H, W) with the mask's edge (a 2-px border of mask, (H, W)) drawn in red."""
    m = mask[None, None]
    edge = (m - (-F.max_pool2d(-m, 5, stride=1, padding=2))).clamp(0, 1)[0, 0].bool()        # mask minus its erosion
    out = image.clone()
    out[:, edge] = torch.tensor([1.0, 0.1, 0.1])[:, None]
    return out


def write_figure(path, x0, x_l, x_c, mask_img, tile):
    """Rows of normal | learned | control | mask outline | |learned - normal| | |control - normal|."""
    from exports import colourise
    rows = []
    for i in range(len(x0)):
        dl, dc = (x_l[i] - x0[i]).abs().mean(0), (x_c[i] - x0[i]).abs().mean(0)                 # (H, W)
        top = max(float(dl.max()), float(dc.max()), 1e-6)                                        # the row's scale
        heat = lambda d: torch.from_numpy(colourise((d / top).numpy())).permute(2, 0, 1).float() / 255
        tiles = [x0[i], x_l[i], x_c[i], outline(x0[i], mask_img[i, 0]), heat(dl), heat(dc)]
        rows.append(torch.cat([F.interpolate(t[None], size=(tile, tile), mode="area")[0] for t in tiles], dim=2))
    grid = (torch.cat(rows, dim=1).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    head = Image.new("RGB", (grid.shape[1], 18), (255, 255, 255))
    for j, name in enumerate(["normal", "learned anomaly", "latent-noise control", "mask", "|learned - normal|",
                              "|control - normal|"]):
        ImageDraw.Draw(head).text((j * tile + 4, 3), name, fill=(0, 0, 0))
    Image.fromarray(np.concatenate([np.asarray(head), grid], axis=0)).save(path)


# ---------------------------------------------------------------------------------------------- main
def load_views(ckpt, data_root):
    """The checkpoint's shots and their augmented views, as train.py made them."""
    cfg = ckpt["config"]
    scan = dict(axis=cfg.get("slice_axis", "axial"), window=tuple(cfg["window"]) if cfg.get("window") else None,
                skip_empty=False)                       # every slice: the checkpoint names the ones it drew
    pool = {r["name"]: r for r in data.load_split(cfg["data"], data_root or cfg["data_root"], "train",
                                                  seed=cfg["seed"], scan=scan)}
    # the image or slice of each view; checkpoints before studies name only the shots, one image each
    names = ckpt.get("view_slices") or [s for s in ckpt["shots"] for _ in range(cfg["views"])]
    missing = sorted({s for s in names if s not in pool})
    if missing:
        raise data.DataError(f"{cfg['data']}: the checkpoint's shots {missing[:3]} are not in its train split")
    return augment.load_views([pool[s] for s in names], cfg["image_size"], cfg["views"], cfg["seed"])  # (k V, 3, S, S)


def load_trainables(ckpt, device):
    """eta_theta, P_theta and the latent statistics (mean, std, each (1, c, 1, 1)) of a checkpoint."""
    cfg = ckpt["config"]
    eta = deviation.build_unet(cfg["unet"], cfg["latent_channels"]).to(device).eval()
    proj = project.build_projection(cfg["projection"], cfg["latent_channels"], cfg["token_dim"], cfg["token_hw"],
                                    len(cfg["layers"])).to(device).eval()
    eta.load_state_dict(ckpt["state_dicts"]["eta"])
    proj.load_state_dict(ckpt["state_dicts"]["projection"])
    mean, std = (torch.tensor(ckpt[k], device=device).view(1, -1, 1, 1) for k in ("latent_mean", "latent_std"))
    return eta, proj, mean, std


def checkpoint_warnings(cfg, path):
    """What makes a checkpoint's synthesis not what it seems: an eta_theta that never trained, random VAE weights."""
    out = []
    if cfg["synth"] not in ("deviation", "mix"):
        out.append(f"{path}: trained with --synth {cfg['synth']}: eta_theta never trained")
    if cfg.get("vae_random", cfg["random_init"] and not cfg["vae_weights"]):
        out.append(f"{path}: random {cfg['vae']} weights: the decoded images and statistics are of a random "
                   f"latent space")
    return out


@torch.no_grad()
def main(args):
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.ckpt)
    cfg, device = ckpt["config"], pick_device(args.device)
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    check_writable(out, "--out")
    views = load_views(ckpt, args.data_root)[:args.n].to(device)
    vae = encode.load_vae(cfg["vae"], cfg["vae_weights"], cfg["random_init"]).to(device)
    eta, proj, mean, std = load_trainables(ckpt, device)
    grey = deviation.grey_for(cfg.get("grey", "off"), cfg["vae"], vae, views, mean, std)

    # the synthesis, exactly as in training: standardised latents, the same draws for learned and control
    z = encode.encode_latents(vae, views)                                                     # (n, c, h, w)
    z_n = (z - mean) / std
    draws = deviation.sample_synthesis(z_n, deviation.foreground(views), cfg["C"], cfg["synth_mask"],
                                       torch.Generator().manual_seed(args.seed), 0, cfg.get("synth_source", "noise"),
                                       cfg.get("eta_noise", "gaussian"))
    base = None if grey is None else grey(z_n)                                                # R(z_n), once for both
    z_l, eta_pred = deviation.synthesise_latent(z_n, draws, eta, deviation.cosine_abar().to(device), grey=grey,
                                                grey_base=base, smooth=cfg.get("eta_smooth", 0.0))
    z_c, _ = deviation.synthesise_latent(z_n, draws, None, grey=grey, grey_base=base)
    decode = lambda zz: encode.vae_decode(vae, zz * std + mean)
    x0, x_l, x_c = decode(z_n), decode(z_l), decode(z_c)                                        # (n, 3, S, S)
    mask_img = draws["label"]                                                                  # (n, 1, S, S)

    reach = decoder_reach(vae, z)
    learned = measure(x0, x_l, mask_img, reach, z_n, z_l, proj)
    learned["shrink_corr"] = masked_corr(eta_pred, -z_n, 1 - draws["m"])
    control = measure(x0, x_c, mask_img, reach, z_n, z_c, proj)
    os.makedirs(out, exist_ok=True)
    write_figure(os.path.join(out, "synthesis.png"), x0.cpu(), x_l.cpu(), x_c.cpu(), mask_img.cpu(), args.tile)
    report = dict(checkpoint=os.path.abspath(args.ckpt), data=cfg["data"], shots=ckpt["shots"], vae=cfg["vae"],
                  n=len(views), seed=args.seed, C=cfg["C"], mask=cfg["synth_mask"], synth=cfg["synth"],
                  grey=grey is not None,
                  eta_steps=cfg["steps"], decoder_reach_px=reach,
                  learned=summarise({k: v.cpu() for k, v in learned.items()}),
                  control=summarise({k: v.cpu() for k, v in control.items()}),
                  definitions=__doc__[__doc__.index("  locality"):].strip())
    report["warnings"] = checkpoint_warnings(cfg, "this checkpoint")
    write_json(report, os.path.join(out, "synthesis.json"))
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    for k in learned:
        c = report["control"].get(k)
        print(f"{k:20s} learned {report['learned'][k]['mean']:8.4f}" + (f"   control {c['mean']:8.4f}" if c else ""))
    print(f"wrote {os.path.join(out, 'synthesis.png')} and synthesis.json (decoder reach {reach} px)")
    return report


if __name__ == "__main__":
    try:
        main(parse_args())
    except (data.DataError, encode.WeightsUnavailable, ValueError) as e:
        sys.exit(f"error: {e}")
