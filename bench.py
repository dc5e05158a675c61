"""
What the method costs, side by side, in one run on one machine: prints a table and writes bench.json.

  1. cache build: seconds per image for the MedVAE encoder and for CLIP up to the deepest block needed
  2. one cached training step (train.py) against one CLIP forward of the same batch, which a pixel-synthesis
     loop such as MediCLIP's must add to every step: the ratio (target <= 5 %), for the mean step of the run
     (with the first steps, in which oneDNN builds its kernels) and for the median one (warm, as the CLIP forward)
  3. a whole one-shot run of train.py against a MediCLIP-style loop (pixel synthesis + CLIP forward every
     step, same steps, batch, detector and prompts): the ratio of wall times (target >= 10x)
  4. evaluation: seconds per image of evaluate.py's path (loading, CLIP, adapters, maps, scores) against a bare
     CLIP forward to the deepest block on the same images: the overhead (target <= 10 %). What evaluate.py does
     once per run (the prompts' text features; under bf16 the cast copy of the image blocks) is timed apart
     (eval_setup_s) and shown with the overhead it adds on this bench's few images; data loading alone is shown too
  5. peak resident memory of train.py and evaluate.py, each in its own process (target < 4 GiB for ViT-L-14)
  6. with --volumes: evaluate.py per study on a 2 mm brain MRI and a CT-sized volume (512 x 512 x 300), the
     frozen forward in fp32 and in bf16, and how far bf16's slice scores and map volume are from fp32's

Random weights (timing does not depend on them) and the synthetic set (no download).

    python bench.py --quick        # ViT-B-16, small work: about a minute
    python bench.py                # ViT-B-16 and ViT-L-14
    python bench.py --volumes      # and the per-study times of volumes
    python bench.py --device cuda --precision auto   # on a GPU, as train.py and evaluate.py run there
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import augment
import data
import encode
import evaluate
import runfiles
import mediclip
import train
import pixel_tasks
import precision

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training and evaluation cost.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ViT-B-16 only, small work (about a minute)")
    p.add_argument("--clips", nargs="+", default=["ViT-B-16", "ViT-L-14"], help="backbones to time")
    p.add_argument("--steps", type=int, default=20, help="training steps of both whole runs")
    p.add_argument("--batch-size", type=int, default=8, help="batch of both training loops")
    p.add_argument("--images", type=int, default=16, help="images for the cache-build and evaluation timings")
    p.add_argument("--views", type=int, default=16, help="views per shot of the train.py runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the default)")
    p.add_argument("--device", default="cpu", help="cpu (the default: figures that compare across machines), cuda, "
                   "or auto (train.py's choice)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="of every forward timed "
                   "(train.py and evaluate.py --precision, the bare CLIP forwards and the MediCLIP-style loop alike); "
                   "fp32 by default, so that the figures compare across machines")
    p.add_argument("--volumes", action="store_true", help="also time evaluate.py per study on a 2 mm brain MRI and a "
                   "CT-sized volume, fp32 and bf16 frozen forwards, and their agreement (minutes for ViT-L-14)")
    p.add_argument("--out", default="bench.json", help="where the figures go")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.steps, args.images, args.views = ["ViT-B-16"], 3, 4, 2
    return args


def timed(f, repeat=1):
    """Best wall time of `repeat` calls (the first call also warms up when repeat > 1); on CUDA, until the GPU is
    done (the kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        f()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def mediclip_style_run(name, layers, views, steps, B, autocast, step_autocast, device, frozen_bf16=False,
                       step_bf16=False, seed=0):
    """The peer's loop with our modules: every step synthesises pixel anomalies and runs the frozen CLIP (in bf16
    from a cast copy of its image blocks, as evaluate.py's per-image forward; bf16 steps read the text tower copy
    of train.py's steps)."""
    t0 = time.perf_counter()
    clip = encode.load_clip(name, random_init=True).to(device)
    S = clip.visual.image_size[0] if not isinstance(clip.visual.image_size, int) else clip.visual.image_size
    tokens_model = encode.CLIPTokens(clip, layers, torch.bfloat16 if frozen_bf16 else None)
    tower = mediclip.TextTower(clip, torch.bfloat16 if step_bf16 else None)
    det = mediclip.build_mediclip(clip, len(layers)).to(device)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(views), (B,), generator=gen)
        x, m = zip(*[pixel_tasks.synthesise_mediclip(views[i], views, gen) for i in idx])
        tokens = [t.clone() for t in encode.encode_tokens(tokens_model, torch.stack(x).to(device), clip, B, autocast)]
        with step_autocast():
            maps = det(tokens, det.text_features(tower), S)
        masks = torch.stack(m).to(device)
        loss = mediclip.focal_loss(maps, masks) + mediclip.dice_loss(maps, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_rss_gib(script, argv):
    """Run a script in its own process and return its peak resident memory (GiB) and wall time."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit this process's peak
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
            "print('PEAK_KB', hwm[0].split()[1] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, os.path.join(HERE, script), *argv], cwd=HERE,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{script} failed: {r.stderr.strip().splitlines()[-1]}")
    kb = int(r.stdout.split("PEAK_KB")[-1].split()[0])
    return kb / 2 ** 20, time.perf_counter() - t


def bench_backbone(name, args, tmp):
    row = dict(clip=name)
    device = runfiles.pick_device(args.device)
    clip = encode.load_clip(name, random_init=True).to(device)
    S = clip.visual.image_size[0] if not isinstance(clip.visual.image_size, int) else clip.visual.image_size
    layers = train.resolve_layers(None, len(clip.visual.transformer.resblocks))
    prec = precision.pick(args.precision, device, clip)   # as train.py runs its forwards
    print(prec["line"])
    frozen_bf16, step_bf16 = prec["frozen"], prec["trainables"]
    copy_dtype = torch.bfloat16 if frozen_bf16 else None   # evaluate.py's bf16 image forward reads a cast copy
    # the per-image forward as evaluate.py runs it (train.py's 16 views, once, skip the bf16 copy: its memory)
    tokens_model = encode.CLIPTokens(clip, layers, copy_dtype)
    records = data.load_split("synthetic", "", "test")[:args.images]
    images = data.load_images(records, S)[0].to(device)
    ac, step_ac = runfiles.bf16_autocast(device, frozen_bf16), runfiles.bf16_autocast(device, step_bf16)
    row["frozen_bf16"], row["step_bf16"] = float(frozen_bf16), float(step_bf16)

    # 1. cache build
    vae = encode.load_medvae("medvae_4_1_2d", random_init=True).to(device)
    row["medvae_s_per_image"] = timed(lambda vae=vae: encode.encode_latents(vae, images, autocast=ac)) / len(images)
    row["clip_s_per_image"] = timed(lambda: encode.encode_tokens(tokens_model, images, clip, autocast=ac)) / len(images)
    del vae
    batch = images[:args.batch_size].repeat(-(-args.batch_size // len(images)), 1, 1, 1)[:args.batch_size]
    row["clip_forward_batch_s"] = timed(lambda: encode.encode_tokens(tokens_model, batch, clip, len(batch), ac), 2)

    # 2 + 3. whole runs: train.py (cached) against the MediCLIP-style loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    path = train.main(train.parse_args(["--data", "synthetic", "--shots", "1", "--random-init", "--clip", name,
                                        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                        "--views", str(args.views), "--eta-warmup", "0", "--device", args.device,
                                        "--out", os.path.join(tmp, name), "--precision", args.precision]))
    row["train_run_s"] = time.perf_counter() - t
    if device.type == "cuda":   # this process also holds bench's own CLIP: an upper bound for train.py alone
        row["train_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    with open(os.path.join(os.path.dirname(path), "timings.json")) as f:
        timings = json.load(f)
    row["train_step_s"] = timings["train_s"] / args.steps
    row["step_over_clip_forward"] = row["train_step_s"] / row["clip_forward_batch_s"]
    # the CLIP forward above is timed warm (best of 2): the same for the step, the median one
    row["train_step_median_s"] = timings["det_step_s_median"]
    row["median_step_over_clip_forward"] = row["train_step_median_s"] / row["clip_forward_batch_s"]
    shots = data.sample_shots(data.load_split("synthetic", "", "train"), 1, 0)
    views = augment.load_views(augment.view_records(shots, args.views, 0), S, args.views, 0)
    row["mediclip_style_run_s"] = mediclip_style_run(name, layers, views, args.steps, args.batch_size, ac, step_ac,
                                                     device, frozen_bf16, step_bf16)
    row["speedup_vs_mediclip_style"] = row["mediclip_style_run_s"] / row["train_run_s"]

    # 4. evaluation against the bare backbone; rounds interleaved so that a busy spell on a shared machine hits
    # both, best of each. What predict does once per run (not per image) is timed apart: the prompts' text features
    # and, under bf16, the cast copy of the image blocks (0.1 s for ViT-B-16: 6 ms per image of these 16)
    ev = evaluate.parse_args(["--ckpt", path, "--batch-size", "16", "--precision", args.precision])
    det = mediclip.build_mediclip(clip, len(layers)).eval().to(device)
    row["load_s_per_image"] = timed(lambda: data.load_images(records, S)) / len(records)
    with torch.inference_mode():
        row["eval_setup_s"] = timed(lambda: (det.text_features(mediclip.TextTower(clip)),
                                             encode.CLIPTokens(clip, layers, copy_dtype)), 2)
    bare, whole = float("inf"), float("inf")
    for _ in range(3):
        bare = min(bare, timed(lambda: encode.encode_tokens(tokens_model, images, clip, autocast=ac)))
        whole = min(whole, timed(lambda: evaluate.predict(records, clip, [det], layers, ev, device)))
    row["bare_clip_s_per_image"] = bare / len(images)
    row["eval_s_per_image"] = (whole - row["eval_setup_s"]) / len(records)
    row["eval_overhead"] = row["eval_s_per_image"] / row["bare_clip_s_per_image"] - 1
    row["eval_overhead_incl_setup"] = whole / bare - 1

    # 5. peak memory, each in its own process
    row["train_peak_gib"], _ = peak_rss_gib("train.py", ["--data", "synthetic", "--shots", "1", "--random-init",
                                                         "--clip", name, "--steps", str(args.steps),
                                                         "--eta-warmup", "0", "--views", str(args.views),
                                                         "--precision", args.precision, "--device", args.device,
                                                         "--out", os.path.join(tmp, "m")])
    row["eval_peak_gib"], _ = peak_rss_gib("evaluate.py", ["--ckpt", os.path.join(tmp, "m", "run.pt"),
                                                           "--overlays", "0", "--precision", args.precision,
                                                           "--device", args.device])
    if args.volumes:
        row.update(bench_volumes(path, tmp, args.device))
    return row


def write_volumes(tmp):
    """A 2 mm brain MRI (the MNI152 template, 99 x 117 x 95) and a CT-sized volume (the same at 512 x 512 x 300)."""
    from scipy import ndimage
    import toy_volumes
    v, a = toy_volumes.normal_study(np.random.default_rng(0))
    brain = toy_volumes.save_nifti(v, a, os.path.join(tmp, "brain", "brain.nii.gz"))
    zoom = np.array([512, 512, 300]) / v.shape
    big = ndimage.zoom(v, zoom, order=1)
    ct = toy_volumes.save_nifti(big, a @ np.diag(list(1 / zoom) + [1]), os.path.join(tmp, "ct", "ct.nii.gz"))
    return dict(brain=brain, ct=ct)


def bench_volumes(ckpt, tmp, device="cpu"):
    """Seconds per study of evaluate.py (reading, slices with anatomy, CLIP, maps, studies.csv and the map
    volume; the model's loading timed apart), fp32 and bf16 frozen forwards, and how far bf16's maps and scores are
    from fp32's."""
    import nibabel as nib
    from scipy.stats import spearmanr
    row, outs = {}, {}
    for kind, path in write_volumes(tmp).items():
        for prec in ("fp32", "bf16"):
            out = os.path.join(tmp, f"{kind}-{prec}")
            t = time.perf_counter()
            evaluate.load_models([ckpt], evaluate.parse_args(["--ckpt", ckpt]), runfiles.pick_device(device))
            load = time.perf_counter() - t
            t = time.perf_counter()
            evaluate.main(evaluate.parse_args(["--ckpt", ckpt, "--images", os.path.dirname(path), "--out", out,
                                               "--overlays", "0", "--precision", prec, "--device", device]))
            row[f"{kind}_study_s_{prec}"] = time.perf_counter() - t - load
            outs[prec] = out
        with open(os.path.join(outs["fp32"], "studies.csv")) as f:
            row[f"{kind}_slices_scored"] = float(list(csv.DictReader(f))[0]["slices_scored"])
        s32, s16 = (np.array([float(r["score"]) for r in csv.DictReader(open(os.path.join(outs[p], "scores.csv")))])
                    for p in ("fp32", "bf16"))
        m32, m16 = (nib.load(os.path.join(outs[p], "maps", os.path.basename(path))).get_fdata()
                    for p in ("fp32", "bf16"))
        row[f"{kind}_bf16_max_abs_score_diff"] = float(np.abs(s32 - s16).max())
        row[f"{kind}_bf16_score_spearman"] = float(spearmanr(s32, s16)[0]) if len(s32) > 2 else float("nan")
        row[f"{kind}_bf16_max_abs_map_diff"] = float(np.abs(m32 - m16).max())
    return row


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.clips:
            rows.append(bench_backbone(name, args, tmp))
    out = dict(machine=dict(threads=torch.get_num_threads(), cpus=os.cpu_count(), torch=torch.__version__,
                            cuda=torch.cuda.is_available(),
                            tf32_matmul=torch.backends.cuda.matmul.allow_tf32), args=vars(args), rows=rows)
    runfiles.write_json(out, args.out)
    keys = [k for k in rows[0] if k != "clip"]
    print(f"{'':30s}" + "".join(f"{r['clip']:>14s}" for r in rows))
    for k in keys:
        print(f"{k:30s}" + "".join(f"{r[k]:14.3f}" for r in rows))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main(parse_args())
