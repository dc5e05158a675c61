"""
Train a one-shot MediCLIP detector on anomalies *learned* in MedVAE latent space.

    args -> device -> data (k shots x V views) -> frozen encoders (run once, then freed)
    -> trainables: eta_theta (deviation.py), P_theta (project.py), adapters + prompts (mediclip.py)
    -> per step:
         x_t, eta      = masked forward of z_n (DeCo-Diff's; n: a    L_deco  = |eta_theta(x_t, t) - eta|^2
                         surrogate of z_n, deviation.sample_surrogate)
         z_anom        = z_n + C (1 - m) eta_pred                     (or the control: latent noise; kept grey
                                                                        for grey images in a colour VAE)
         maps          = MediCLIP(P(z_anom)), MediCLIP(P(z_n)), MediCLIP(CLIP tokens)   masks: region, 0, 0
                         (region drawn at image resolution; m its soft latent mask: deviation.sample_synthesis)
         L_det         = focal + dice                                 L_align = 1 - cos(P(z_n), CLIP tokens)
         total         = w1 L_det + w2 L_deco + w3 L_align
    -> calibration set: the shots' views and as many fresh synthetic anomalies, scored (evaluate.py's Platt fit)
    -> save one checkpoint (atomically) and print the evaluate command.
Baselines (--synth mediclip | pixel-noise | mix) add anomalies synthesised in pixel space: a bank of --bank views,
encoded by the frozen CLIP once before the loop, like the normal views (pixel_tasks.py).

A fixed number of steps; the last checkpoint is the result. The test split is never read here.

    python train.py --data brainmri --data-root ../shared/data --shots 1
    python train.py --data synthetic --shots 1 --random-init --clip ViT-B-16 --steps 200
"""
import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import calibration as calib
import data
import deviation
import encode
import encodings_cache
import mediclip
import precision
import project
import runfiles

SYNTH_MODES = ("deviation", "latent-noise", "mediclip", "pixel-noise", "mix")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train MediCLIP on learned latent anomalies (one-shot).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default="brainmri", help="dataset name: brainmri, busi, chexpert, synthetic, or "
                   "any folder under --data-root in the MediCLIP or MVFA layout")
    p.add_argument("--data-root", default="data", help="folder that holds the datasets")
    p.add_argument("--shots", type=int, default=1, help="k: number of normal training studies (an image, or a "
                   "NIfTI volume or DICOM series whose views are drawn from its slices with anatomy)")
    p.add_argument("--seed", type=int, default=0, help="picks the shots and seeds everything else")
    p.add_argument("--views", type=int, default=16, help="augmented views per shot, encoded once")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("C", "W"), help="DICOM/NIfTI: intensity "
                   "window (centre, width) on the rescaled values, e.g. 40 400 for brain CT (default: the file's own, "
                   "else its 0.5-99.5 percentiles)")
    p.add_argument("--slice-axis", default="axial", choices=["axial", "coronal", "sagittal"],
                   help="NIfTI volumes: the axis they are sliced along")
    p.add_argument("--all-slices", action="store_true", help="volumes and series: draw views from every slice "
                   "(default: only slices with anatomy, data.has_anatomy)")
    # model
    p.add_argument("--clip", default="ViT-L-14", help="open_clip model name (MediCLIP: ViT-L-14 at 224 px)")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag")
    p.add_argument("--clip-weights", default=None, help="local CLIP state-dict file instead of the tag")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="CLIP blocks to read, counted from 1 "
                   "(default: at 1/2, 3/4 and all of the depth, i.e. MediCLIP's 12 18 24 for ViT-L-14)")
    p.add_argument("--vae", default="medvae_4_1_2d", choices=list(encode.VAE_NAMES), help="the latent space: a "
                   "MedVAE 2D model, or taef2 (a tiny real autoencoder that runs offline; not medical)")
    p.add_argument("--vae-weights", default=None, help="local MedVAE checkpoint instead of the hub (taef2: a folder "
                   "with taef2_encoder.pth and taef2_decoder.pth); it wins over --random-init")
    p.add_argument("--random-init", action="store_true", help="random CLIP and MedVAE weights (smoke runs only)")
    p.add_argument("--unet", default="small", choices=list(deviation.UNET_PRESETS), help="eta_theta size")
    p.add_argument("--projection", default="small", choices=list(project.PROJECTION_PRESETS), help="P_theta size")
    p.add_argument("--synth", default="deviation", choices=SYNTH_MODES,
                   help="deviation: z_n + C eta_theta (the method); latent-noise: z_n + C n (its control); "
                   "mediclip: MediCLIP's pixel tasks; pixel-noise: Gaussian noise in a random mask; mix: "
                   "deviation and mediclip anomalies in every step")
    p.add_argument("--bank", type=int, default=128, help="pixel-space modes: synthesised views encoded once")
    p.add_argument("--synth-mask", default="lesions", choices=["lesions", "blobs", "patches"],
                   help="anomaly regions: lesions (smooth blobs drawn at image resolution, soft latent masks), blobs "
                   "(the same drawn on the latent grid) or DeCo-Diff patches (deviation.sample_synthesis)")
    p.add_argument("--eta-smooth", type=float, default=0.0, help="low-pass eta_pred by a Gaussian of this many "
                   "latent cells before it synthesises (deviation.smooth_eta; 0: off)")
    p.add_argument("--synth-source", default="noise", choices=["noise", "tissue"], help="what the synthesis's "
                   "masked forward puts into the region for eta_theta to read: noise (of --eta-noise's kind), or the "
                   "image's own tissue from elsewhere (DeCo-Diff's shuffled patches; deviation.sample_tissue)")
    p.add_argument("--eta-noise", default="surrogate", choices=["surrogate", "gaussian"], help="the masked "
                   "forward's n, in training and synthesis: the latent's own phase-randomised surrogate (its spectrum "
                   "and channel structure: deviation.sample_surrogate; docs/realism.md) or Gaussian (DeCo-Diff); the "
                   "latent-noise control keeps Gaussian n")
    p.add_argument("--C", type=float, nargs=2, default=[0.5, 1.5], metavar=("LO", "HI"),
                   help="deviation size in latent stds, drawn uniformly from [LO, HI] (docs/realism.md: measured)")
    p.add_argument("--grey", default="decode", choices=["decode", "off"], help="grey-scale images in a VAE that "
                   "decodes colour (taef2, medvae_4_3/_8_4): keep their anomalies grey through the grey decoding "
                   "(deviation.keep_grey; one VAE decode + encode of the batch per step); the 1-channel MedVAEs "
                   "decode grey by construction and skip it")
    p.add_argument("--eta-warmup", type=int, default=50, help="steps eta_theta trains alone before it synthesises")
    p.add_argument("--det-trains-eta", action="store_true", help="let the detection loss train eta_theta too")
    # optim
    p.add_argument("--steps", type=int, default=300, help="training steps (fixed; the last checkpoint is kept)")
    p.add_argument("--batch-size", type=int, default=8, help="views per step (MediCLIP: 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (MediCLIP: 1e-3, betas 0.5, 0.999)")
    p.add_argument("--w1", type=float, default=1.0, help="weight of L_det (focal + dice)")
    p.add_argument("--w2", type=float, default=1.0, help="weight of L_deco (deviation MSE)")
    p.add_argument("--w3", type=float, default=1.0, help="weight of L_align (1 - cos)")
    # run
    p.add_argument("--out", default=None, help="run folder (default runs/<data>-k<shots>-s<seed>)")
    p.add_argument("--log-every", type=int, default=10, help="log every loss term every N steps")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--cache", default=None, help="folder to keep the frozen encodings of the views in, keyed by "
                   "their pixels, the encoders and encode.py: runs on the same shots (other --synth, steps, "
                   "weights of the losses) skip MedVAE and CLIP on them")
    p.add_argument("--save-synthesis", type=int, default=0, metavar="N", help="at the end, decode the synthesis "
                   "of N views into synthesis.png and synthesis.json beside the checkpoint (synthesise.py)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 autocast of the "
                   "forwards (fp32 weights, optimiser and losses either way). auto: on a CPU, per path (frozen "
                   "forwards, trainables), whichever this machine runs faster, timed once and cached (precision.py); "
                   "on CUDA the frozen ones")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="= --precision bf16")
    return p.parse_args(argv)


def check_args(args):
    """Refuse up front, in one line, what would fail or mislead only after minutes of encoding."""
    for flag in ("shots", "steps", "views", "batch_size", "bank"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.synth in ("deviation", "mix") and args.steps <= args.eta_warmup:
        # eta_theta synthesises only after its warm-up: before it there is no anomaly, so no detection loss
        raise ValueError(f"--steps {args.steps} <= --eta-warmup {args.eta_warmup}: with --synth {args.synth} the "
                         f"detector would never train (anomalies exist only after eta_theta's warm-up); pass more "
                         f"--steps or a smaller --eta-warmup (e.g. --eta-warmup {args.steps // 5})")
    runfiles.check_writable(args.out or "runs", "--out")


def resolve_layers(layers, depth):
    return list(layers) if layers else [depth // 2, 3 * depth // 4, depth]


def build_trainables(config, clip):
    """eta_theta, P_theta and MediCLIP from a config dict (also used by evaluate.py to rebuild them)."""
    eta = deviation.build_unet(config["unet"], config["latent_channels"])
    proj = project.build_projection(config["projection"], config["latent_channels"], config["token_dim"],
                                    config["token_hw"], len(config["layers"]))
    det = mediclip.build_mediclip(clip, len(config["layers"]))
    return eta, proj, det


def main(args):
    t0 = time.time()
    check_args(args)
    # ---- device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runfiles.pick_device(args.device)
    prec = precision.pick(args.precision, device, args.clip)   # auto: timed here once per machine, then cached
    print(prec["line"])
    frozen_bf16, step_bf16 = prec["frozen"], prec["trainables"]     # fp32 weights and losses either way
    autocast, step_autocast = runfiles.bf16_autocast(device, frozen_bf16), runfiles.bf16_autocast(device, step_bf16)
    gen = torch.Generator().manual_seed(args.seed)  # every random draw of the loop, on the CPU: reproducible
    out = args.out or os.path.join("runs", f"{os.path.basename(args.data.rstrip('/'))}-k{args.shots}-s{args.seed}")

    # ---- data: k normal shots (studies), V augmented views each (the test split is never read)
    args.data_root = os.path.abspath(args.data_root)  # stored in the checkpoint: evaluate.py may run elsewhere
    pool = data.load_split(args.data, args.data_root, "train", seed=args.seed, scan=data.scan_options(args))
    shots = data.sample_shots(pool, args.shots, args.seed)                # k studies, each a list of records
    view_recs = augment.view_records(shots, args.views, args.seed)          # the image or slice of each view

    # ---- frozen encoders, run once over all views (or read from --cache), then freed
    clip = encode.load_clip(args.clip, args.pretrained, args.clip_weights, args.random_init).to(device)
    image_size = clip.visual.image_size if isinstance(clip.visual.image_size, int) else clip.visual.image_size[0]
    layers = resolve_layers(args.layers, len(clip.visual.transformer.resblocks))
    clip_random, vae_random = args.random_init and not args.clip_weights, args.random_init and not args.vae_weights
    if clip_random or vae_random:
        print(f"warning: random {' and '.join(['CLIP'] * clip_random + [args.vae] * vae_random)} weights "
              f"(--random-init): a smoke run; its numbers say nothing about the method")
    views = augment.load_views(view_recs, image_size, args.views, args.seed)  # (k V, 3, S, S)
    tokens_model = encode.CLIPTokens(clip, layers)   # no bf16 copy here (evaluate.py's): +0.6 GiB at the peak
    real, z, cached = encodings_cache.encode_views(views, clip, tokens_model, layers, device, autocast,
                                                   args)     # CLIP tokens (list of (k V, D, H, W)), z (k V, c, h, w)
    train_idx, held_idx = augment.split_held_out(len(views), args.views)
    uses_eta = args.synth in ("deviation", "mix")
    uses_latent = args.synth in ("deviation", "latent-noise", "mix")
    uses_bank = args.synth in ("mediclip", "pixel-noise", "mix")
    if uses_bank:  # pixel-space baselines: a bank of synthesised views, encoded once like the normals
        print(f"synthesising and encoding a bank of {args.bank} {args.synth} anomalies ...", flush=True)
        bank, bank_masks = encodings_cache.encode_bank(views[train_idx], clip, tokens_model, device, autocast, args)
    text_tower = mediclip.TextTower(clip)   # and for bf16 steps a copy with its linear weights cast once, not per step
    step_tower = mediclip.TextTower(clip, torch.bfloat16) if step_bf16 else text_tower
    del tokens_model  # the loop never runs the frozen image encoders
    encode_s = time.time() - t0
    z_n, z_mean, z_std = deviation.standardise(z)      # per channel, with statistics of the views
    fg = deviation.foreground(views).to(device)          # (k V, 1, S, S) bool
    grey = grey_base = None  # a colour VAE tints grey anomalies: keep them grey (deviation.keep_grey)
    if uses_latent and args.grey == "decode" and deviation.decodes_colour(args.vae) and deviation.is_grey(views):
        vae = encode.load_vae(args.vae, args.vae_weights, args.random_init).to(device)
        grey = deviation.grey_round_trip(vae, z_mean.view(1, -1, 1, 1), z_std.view(1, -1, 1, 1))
        with torch.no_grad():
            grey_base = grey(z_n)                          # R(z_n) of every view, once

    # ---- trainables: their initialisation depends on the seed only, not on how the encoders were loaded
    torch.manual_seed(args.seed)
    config = dict(vars(args))
    config.update(layers=layers, clip_act=encode.clip_activation(clip), clip_random=clip_random,
                  vae_random=vae_random, image_size=image_size, token_dim=real[0].shape[1], token_hw=real[0].shape[-1],
                  latent_channels=z.shape[1], latent_hw=z.shape[-1], n_views=len(views), held_out_views=len(held_idx),
                  bank_size=len(bank_masks) if uses_bank else 0, grey_applied=grey is not None,
                  frozen_bf16=frozen_bf16, bf16=step_bf16)
    eta, proj, det = (m.to(device) for m in build_trainables(config, clip))
    del clip.visual  # adapters are initialised from it; from here on only the text tower is needed
    opt = torch.optim.Adam([*eta.parameters(), *proj.parameters(), *det.parameters()],   # fused: one kernel for all
                           lr=args.lr, betas=(0.5, 0.999), fused=True)                   # (CPU: 7.1 -> 2.6 ms)
    abar = deviation.cosine_abar().to(device)
    os.makedirs(out, exist_ok=True)  # only now: bad input above leaves nothing behind
    runfiles.write_json(config, os.path.join(out, "config.json"))

    # ---- loop
    log = open(os.path.join(out, "log.csv"), "w", newline="")
    writer = first = None
    B, S = args.batch_size, image_size
    zero, no_anomaly = torch.zeros((), device=device), torch.zeros(B, 1, S, S, device=device)
    det_steps, step = 0, 0  # steps in which the detection loss was computed (after eta_theta's warm-up)
    det_step_s = []         # and the seconds of each (timings.json: their median, free of the first steps' set-up)
    try:
        # eta_theta's warm-up steps are fast: the bar says so, and its ETA (recent steps) settles soon after
        for step in (bar := tqdm(range(1, args.steps + 1), desc="eta warm-up" if uses_eta and args.eta_warmup else
                                 "train", dynamic_ncols=True, smoothing=0.1)):
            if step == args.eta_warmup + 1 and uses_eta:
                bar.set_description("train")
            t_step = time.time()
            with step_autocast():
                idx = train_idx[torch.randint(len(train_idx), (B,), generator=gen)]
                z0, tok, fg_b = z_n[idx], [t[idx] for t in real], fg[idx]
                h, w = z0.shape[-2:]
                warm = uses_eta and step <= args.eta_warmup
                parts, masks = [], []   # what the detector reads: token lists (one tensor per layer), their masks
                loss_deco = loss_align = cos = zero

                if uses_eta:  # 1. DeCo-Diff masked forward process: eta_theta learns to predict the deviation
                    m, s = deviation.sample_patch_mask(B, h, w, gen, device)
                    t = torch.randint(deviation.T, (B,), generator=gen).to(device)
                    n = deviation.sample_noise(z0, s, gen, args.eta_noise)
                    x_t, eta_target = deviation.masked_forward(z0, m, t, n, abar)
                    loss_deco = F.mse_loss(eta(x_t, t).float(), eta_target)

                if uses_latent:  # 2. synthesis: z_anom = z_n + C (1 - m) eta_pred (or n), label = the region
                    draws = deviation.sample_synthesis(z0, fg_b, args.C, args.synth_mask, gen, 0, args.synth_source,
                                                       args.eta_noise)
                    # warm-up: eta's output is unused; draw (the random stream stays the same), skip the synthesis
                    z_anom = None if warm else deviation.synthesise_latent(
                        z0, draws, eta if uses_eta else None, abar, args.det_trains_eta, grey,
                        None if grey is None else grey_base[idx], args.eta_smooth)[0]
                    # 3. project into CLIP token space; keep P aligned with the real tokens of the same views
                    projected = proj(z0 if warm else torch.cat([z_anom, z0]))       # list of ((1 or 2) B, D, H, W)
                    loss_align, cos = project.alignment_loss([p[-B:] for p in projected], tok)
                    if not warm or uses_bank:  # the anomalies (none in the warm-up) and the projected normals,
                        parts.append(projected)  # whole: slicing them apart costs a copy each in the backward
                        masks += [no_anomaly] if warm else [draws["label"], no_anomaly]   # (B, 1, S, S) each

                if uses_bank:  # pixel-space anomalies, encoded by the frozen CLIP once before the loop
                    j = torch.randint(len(bank_masks), (B,), generator=gen)
                    parts.append([b[j] for b in bank])
                    masks.append(bank_masks[j])

                # 4. detect: latent anomalies, projected normals, the bank's anomalies, then the real CLIP tokens
                loss_focal = loss_dice = zero
                if parts:
                    parts.append(tok)
                    tokens = [torch.cat([p[i] for p in parts]) for i in range(len(layers))]  # each (nB, D, H, W)
                    mask = torch.cat(masks + [no_anomaly])                                  # (nB, 1, S, S)
                    maps = det(tokens, det.text_features(step_tower), S)             # (nB, 2, S, S)
                    loss_focal, loss_dice = mediclip.focal_loss(maps, mask), mediclip.dice_loss(maps, mask)
                    det_steps += 1

                loss = args.w1 * (loss_focal + loss_dice) + args.w2 * loss_deco + args.w3 * loss_align
            terms = dict(focal=loss_focal.item(), dice=loss_dice.item(), deco=loss_deco.item(), align=loss_align.item(),
                         total=loss.item())
            runfiles.check_finite(step, terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            det_step_s += [time.time() - t_step] if parts else []

            if step % args.log_every == 0 or step in (1, args.steps):
                with torch.no_grad():
                    held_cos = project.alignment_loss(proj(z_n[held_idx]), [r[held_idx] for r in real])[1].item() \
                        if len(held_idx) and uses_latent else float("nan")
                row = dict(step=step, **terms, align_cos=float(cos), held_align_cos=held_cos, warmup=int(warm))
                if writer is None:
                    writer = csv.DictWriter(log, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                log.flush()
                bar.set_postfix(det=f"{terms['focal'] + terms['dice']:.3f}", deco=f"{terms['deco']:.3f}",
                                cos=f"{held_cos:.3f}")
                first = first or row
    except KeyboardInterrupt:  # one line, not a traceback: the run folder keeps config.json and log.csv
        raise KeyboardInterrupt(f"interrupted at step {step} of {args.steps}; no checkpoint was saved") from None
    log.close()
    train_s = time.time() - t0 - encode_s

    # ---- calibration set: what a few-shot user has, scored by the trained detector. Every view of the shots
    # (normal; the detector has trained on them, so their scores are optimistic) and as many fresh synthetic
    # anomalies of the kind it trained on, from their own generator. evaluate.py fits Platt scaling on it.
    with torch.no_grad():
        text = det.text_features(text_tower)
    cal_gen = torch.Generator().manual_seed(args.seed + 1)
    synth_tokens = None if not uses_latent else lambda s: proj(deviation.synthesise_latent(
        z_n[s], deviation.sample_synthesis(z_n[s], fg[s], args.C, args.synth_mask, cal_gen, 0, args.synth_source,
                                           args.eta_noise),
        eta if uses_eta else None, abar, grey=grey,
        grey_base=None if grey is None else grey_base[s], smooth=args.eta_smooth)[0])
    calibration = calib.calibration_set(det, text, S, real, synth_tokens, (bank, bank_masks) if uses_bank else None,
                                        args)
    calib_s = time.time() - t0 - encode_s - train_s

    # ---- save
    ckpt = {
        "format_version": runfiles.FORMAT_VERSION,
        "config": config,
        "shots": [data.study_of(recs[0]) for recs in shots],              # the k studies
        "view_slices": [r["name"] for r in view_recs],                    # the image or slice of each view
        "seed": args.seed,
        "latent_mean": z_mean.cpu().tolist(), "latent_std": z_std.cpu().tolist(),
        "state_dicts": {"eta": eta.state_dict(), "projection": proj.state_dict(), "mediclip": det.state_dict()},
        "calibration": calibration,
        "stats": {"first": first, "last": row, "detector_steps": det_steps},
        "code_version": runfiles.code_version(),
    }
    # the checkpoint's bytes depend on its inputs only; how long it took goes beside it
    runfiles.write_json(dict(encode_s=encode_s, train_s=train_s, calib_s=calib_s, encodings_cached=cached,
                             det_step_s_median=float(torch.tensor(det_step_s).median()) if det_step_s else None,
                             wall_s=time.time() - t0, precision=prec), os.path.join(out, "timings.json"))
    path = os.path.join(out, "run.pt")
    runfiles.save_checkpoint(ckpt, path)
    print(f"first log row: {first}\nlast log row:  {row}")
    print(f"saved {path} ({time.time() - t0:.0f} s)\nnext: python evaluate.py --ckpt {path}")
    if args.save_synthesis:  # decoded anomalies of this run, beside it (synthesise.py)
        import synthesise
        synthesise.main(synthesise.parse_args(["--ckpt", path, "--n", str(args.save_synthesis)]))
    return path


if __name__ == "__main__":
    try:
        main(parse_args())
    except (data.DataError, encode.WeightsUnavailable, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted; no checkpoint was saved'}", file=sys.stderr)
        sys.exit(130)
