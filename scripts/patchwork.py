"""
Where does the learned anomalies' patchwork come from? One checkpoint's eta_theta, the synthesis decoded under
variants of one setting at a time (the region's mask, a low-pass of eta_pred, C, the step t), each measured
against the real lesions of the dev half (realism.py's split and cache) without any classifier, so it runs in a
few minutes on a CPU:

    python scripts/patchwork.py --ckpt runs/taef2-busi-k1-s0/run.pt --cache runs/realism-cache --out runs/patchwork

per variant (same draws for all: seed 0):
  grid_outline   share of the label's outline pixels that lie on a latent cell's border: ~0.45 for an outline
                 that ignores the grid, 1 for the grid's staircase
  grid_power     share of the decoded change's power on the spectrum's lines at multiples of the latent grid's
                 frequency (period S/h px), either axis: tiles of the latent grid put their power there
  slope_dz       spectrum slope of the latent deviation z_anom - z_n (synthesise.spectrum_slope): 0 white
  contrast, texture, sharpness, slope, compactness: descriptor means (lesions.py), and their w1 to the real
                 lesions in units of the real std
and, once, the spectrum slopes of z_n, of n and of eta_pred (raw) on the latent grid.
Writes OUT/patchwork.json and OUT/patchwork.md.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import deviation  # noqa: E402
import encode  # noqa: E402
import lesions  # noqa: E402
import realism  # noqa: E402
import synthesise  # noqa: E402
from runfiles import load_checkpoint, write_json  # noqa: E402

SHOWN = ("contrast", "texture", "sharpness", "slope", "compactness")
# (name, mask, eta low-pass in cells, C range, least t): one setting changed at a time from the first two rows
VARIANTS = [("hard mask (blobs), raw eta", "blobs", 0, (1, 3), 0),
            ("soft mask (lesions), raw eta", "lesions", 0, (1, 3), 0),
            ("hard mask, eta low-passed 1 cell", "blobs", 1, (1, 3), 0),
            ("soft mask, eta low-passed 1 cell", "lesions", 1, (1, 3), 0),
            ("soft mask, eta low-passed 2 cells", "lesions", 2, (1, 3), 0),
            ("soft mask, raw eta, C 0.5-1.5", "lesions", 0, (0.5, 1.5), 0),
            ("soft mask, raw eta, C 2-4", "lesions", 0, (2, 4), 0),
            ("soft mask, raw eta, t >= 7", "lesions", 0, (1, 3), 7)]


def grid_outline(label, cell):
    """Share of the outline pixels (inside, next to outside) that sit on a latent cell's border. label (N, 1, S, S)."""
    m = label[:, 0] > 0.5
    pad = torch.nn.functional.pad(m[:, None].float(), (1, 1, 1, 1), value=0)[:, 0]
    edge = m & ~((pad[:, :-2, 1:-1] > 0) & (pad[:, 2:, 1:-1] > 0) & (pad[:, 1:-1, :-2] > 0) & (pad[:, 1:-1, 2:] > 0))
    S = m.shape[-1]
    i = torch.arange(S) % cell
    border = ((i == 0) | (i == cell - 1))
    on = border[None, :, None] | border[None, None, :]
    return float((edge & on).sum() / edge.sum().clamp_min(1))


def grid_power(change, h):
    """Share of the decoded change's power (grey, (N, 3, S, S)) on spectrum lines at multiples of h (either axis)."""
    p = torch.fft.fft2(change.mean(1).double()).abs() ** 2                                    # (N, S, S)
    S = p.shape[-1]
    f = torch.fft.fftfreq(S) * S                                                             # cycles per image
    on = torch.zeros(S, dtype=torch.bool)
    for j in range(1, S // (2 * h) + 1):
        on |= (f.abs() - j * h).abs() <= 1
    lines = on[None, :, None] | on[None, None, :]
    p[:, 0, 0] = 0                                                                           # the mean change
    return float((p * lines).sum() / p.sum().clamp_min(1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (its eta_theta, VAE and latent statistics)")
    p.add_argument("--data-root", default=None, help="folder that holds the datasets (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=96, help="anomalies per variant")
    p.add_argument("--cache", default=None, help="realism.py's cache of the real lesions")
    p.add_argument("--out", required=True, help="folder for patchwork.json and patchwork.md")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    name, root, S = cfg["data"], args.data_root or cfg["data_root"], cfg["image_size"]
    vae = encode.load_vae(cfg["vae"], cfg["vae_weights"], cfg["random_init"])
    images, masks = realism.load_real(name, root, ["dev"], S)[0]["dev"]               # never the held half
    real = realism.describe_real(vae, images, masks, cfg, args.cache, "cpu")["X"]
    pool, _ = data.load_images([r for r in data.load_split(name, root, "train") if r["label"] == 0], S)
    eta, _, mean, std = synthesise.load_trainables(ckpt, "cpu")
    idx = torch.arange(args.n) % len(pool)
    with torch.no_grad():
        z_pool = (encode.encode_latents(vae, pool) - mean) / std
        z_n, x = z_pool[idx], pool[idx]
        h = z_n.shape[-1]
        grey = deviation.grey_for(cfg.get("grey", "off"), cfg["vae"], vae, pool, mean, std)
        base = None if grey is None else grey(z_pool)[idx]
        decode = lambda zz: torch.cat([encode.vae_decode(vae, zb * std + mean) for zb in zz.split(16)])
        x0 = decode(z_n)
        rows, spectra = [], None
        for label, mask, smooth, C, t_min in VARIANTS:
            draws = deviation.sample_synthesis(z_n, deviation.foreground(x), C, mask, torch.Generator().manual_seed(0),
                                               t_min)
            z_a, eta_pred = deviation.synthesise_latent(z_n, draws, eta, deviation.cosine_abar(), grey=grey,
                                                        grey_base=base, smooth=smooth)
            spectra = spectra or dict(z_n=float(synthesise.spectrum_slope(z_n).mean()),
                                      n=float(synthesise.spectrum_slope(draws["n"]).mean()),
                                      eta_pred=float(synthesise.spectrum_slope(eta_pred).mean()))
            x_a = decode(z_a)
            keep = draws["label"].flatten(1).sum(1) >= realism.MIN_AREA
            X, _ = lesions.describe_group(x_a[keep], draws["label"][keep])
            j = [lesions.DESCRIPTORS.index(d) for d in SHOWN]
            rows.append(dict(variant=label, grid_outline=grid_outline(draws["label"], S // h),
                             grid_power=grid_power(x_a - x0, h),
                             slope_dz=float(synthesise.spectrum_slope(z_a - z_n).mean()),
                             means={d: float(X[:, k].mean()) for d, k in zip(SHOWN, j)},
                             w1={d: v for d, v in lesions.w1(real, X).items() if d in SHOWN}))
            print(rows[-1], flush=True)
    real_means = {d: float(real[:, lesions.DESCRIPTORS.index(d)].mean()) for d in SHOWN}
    lines = ["| variant | grid_outline | grid_power | slope_dz | " + " | ".join(f"{d} (w1)" for d in SHOWN) + " |",
             "|" + "---|" * (4 + len(SHOWN)),
             "| real (dev half) | - | - | - | " + " | ".join(f"{real_means[d]:.3f}" for d in SHOWN) + " |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['grid_outline']:.2f} | {r['grid_power']:.3f} | {r['slope_dz']:.2f} | " +
                     " | ".join(f"{r['means'][d]:.3f} ({r['w1'][d]:.2f})" for d in SHOWN) + " |")
    lines.append(f"\nspectrum slopes on the latent grid: z_n {spectra['z_n']:.2f}, n {spectra['n']:.2f}, "
                 f"eta_pred {spectra['eta_pred']:.2f}")
    os.makedirs(args.out, exist_ok=True)
    write_json(dict(checkpoint=os.path.abspath(args.ckpt), n=args.n, real_means=real_means, spectra=spectra,
                    variants=rows), os.path.join(args.out, "patchwork.json"))
    with open(os.path.join(args.out, "patchwork.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
