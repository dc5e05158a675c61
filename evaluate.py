"""
Evaluate a trained checkpoint (or CLIP zero-shot) on a test split. At test time a real image goes through the
frozen CLIP, the adapters and the prompts: an anomaly map and an image score (no MedVAE, no projection).

    python evaluate.py --ckpt runs/brainmri-k1-s0/run.pt                          # its own dataset's test split
    python evaluate.py --ckpt run.pt --data busi --data-root ../shared/data       # another dataset
    python evaluate.py --ckpt runs/busi-k1-s*/run.pt --out runs/busi-k1-ensemble  # support-set seeds together
    python evaluate.py --ckpt run.pt --calib-split 0.2                            # calibrate on 20% of the test set
    python evaluate.py --ckpt run.pt --images my_scans/                           # own images, no labels
    python evaluate.py --ckpt run.pt --images IN --mood-out OUT --mood-task pixel # MOOD's submission files
    python evaluate.py --zero-shot --random-init --clip ViT-B-16 --data busi --data-root ../shared/data

Reports what a clinical evaluation needs, not one number (written into --out, default beside the checkpoint):
- metrics.json: image AUROC and AP; pixel AUROC, AP and AUPRO where every anomalous image has a mask; both per
  anomaly class; 95% bootstrap confidence intervals of image and pixel AUROC (images resampled, seeded).
- calibration: Platt scaling (Platt 1999) of the image score, fitted only on what a few-shot user has (the
  checkpoint's calibration set: its shots' views and fresh synthetic anomalies, see train.py), or with
  --calib-split f on a labelled fraction f of the test set, which is then left out of every reported number.
  Expected calibration error (Guo et al. 2017, 15 bins) and a reliability diagram (reliability.png).
- operating points: calibrated p >= 0.5, and the threshold that reaches --target-sensitivity on the data the
  calibration was fitted on; sensitivity, specificity and the confusion matrix, per class.
- several --ckpt (one per support-set seed): mean +- std of every metric over them, the ensemble (mean score,
  mean calibrated probability) as the headline, each image's score spread in scores.csv and the most uncertain.
- scores.csv (one row per image), roc.png, and a few overlays (image | anomaly map | mask).
- studies.csv (one row per study: a NIfTI volume, a DICOM series, a file; studies.py): the study score
  (--study-score), its peak slice, the call, the map volume maps/<study>.nii.gz; per-study metrics for labelled
  volumes; with --mood-out, MOOD's sample or pixel files for the NIfTI volumes of --images.

This file is the pipeline: checkpoints -> model -> maps and scores -> report files. The maths lives beside it:
metrics.py (AUROC, AP, AUPRO, bootstrap CIs, ROC figure), calibration.py (Platt, ECE, operating points, which
data the calibration is fitted on) and studies.py (study scores, studies.csv, MOOD).
"""
import argparse
import csv
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import encode
import exports
import folders
import mediclip
import precision
import report
import studies
from runfiles import CheckpointError, bf16_autocast, check_writable, load_checkpoint, pick_device
from train import resolve_layers
from weights import sha256

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a one-shot MediCLIP checkpoint (or CLIP zero-shot).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default=None, help="dataset to test on (default: the checkpoint's own)")
    p.add_argument("--data-root", default=None, help="folder that holds the datasets (default: the checkpoint's)")
    p.add_argument("--images", default=None, help="a folder of own images to score, without labels (PNG, JPEG, "
                   "TIFF, BMP, DICOM, NIfTI)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("C", "W"), help="DICOM/NIfTI intensity "
                   "window (centre, width) (default: the checkpoint's; else the file's own, else its percentiles)")
    p.add_argument("--slice-axis", default=None, choices=["axial", "coronal", "sagittal"],
                   help="NIfTI volumes: the axis they are sliced along (default: the checkpoint's, else axial)")
    p.add_argument("--all-slices", action="store_true", help="volumes and series: score every slice (default: only "
                   "slices with anatomy, data.has_anatomy; the others get 0 in the map volume)")
    p.add_argument("--slice-stride", type=int, default=1, help="volumes and series: score every N-th slice with "
                   "anatomy (the others get 0 in the map volume)")
    p.add_argument("--study-score", default="max", choices=studies.RULES, help="a study's score from its slices: "
                   "max (of the slice scores) or top-voxels (mean of the top 0.1%% of the stacked map); studies.py")
    # model
    p.add_argument("--ckpt", nargs="+", default=None, help="checkpoint(s) written by train.py; several (one per "
                   "support-set seed, same backbone) are reported one by one and as an ensemble")
    p.add_argument("--zero-shot", action="store_true", help="no checkpoint: CLIP's zero-shot maps")
    p.add_argument("--clip", default=None, help="open_clip model (zero-shot; default ViT-L-14)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: the checkpoint's, openai)")
    p.add_argument("--clip-weights", default=None, help="local CLIP state-dict file")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="CLIP blocks (zero-shot; default as train.py)")
    p.add_argument("--random-init", action="store_true", help="random CLIP weights (zero-shot smoke runs only)")
    p.add_argument("--topk", type=int, default=0, help="image score: mean of the top-k map pixels (0: the max)")
    # report
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    p.add_argument("--calib-split", type=float, default=0.0, help="fit calibration and thresholds on this labelled "
                   "fraction of the test set and report on the rest (0: on the checkpoint's few-shot set)")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="operating point: the threshold that "
                   "reaches this sensitivity on the calibration data")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of --calib-split")
    # run
    p.add_argument("--out", default=None, help="results folder (default: beside the (first) checkpoint; with "
                   "--images, its own folder there, images-<FOLDER>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out (refused "
                   "otherwise: two runs' files never mix in one folder)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.add_argument("--overlays", type=int, default=8, help="number of overlay PNGs to write")
    p.add_argument("--save-maps", action="store_true", help="export every anomaly map in its input's geometry: "
                   "maps/<name>.npz, or maps/<file>.nii.gz for a NIfTI volume")
    p.add_argument("--mood-out", default=None, help="with --images: also write MOOD's submission files for every "
                   "NIfTI there into this folder (--mood-task)")
    p.add_argument("--mood-task", default="sample", choices=["sample", "pixel"], help="MOOD: <name>.nii.gz.txt with "
                   "the study score, or <name>.nii.gz with voxel scores on the input's grid")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the frozen CLIP forward: "
                   "auto is bf16 on CUDA and, on a CPU, whichever this machine runs faster (timed once and cached, "
                   "as train.py: precision.py); the adapters and maps stay fp32")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- model
def check_request(ckpts, paths, args):
    """Refuse a backbone or layer set other than the checkpoints', and an ensemble of different backbones,
    rather than silently evaluate nonsense."""
    first = ckpts[0]["config"]
    for ckpt, path in zip(ckpts, paths):
        cfg = ckpt["config"]
        if args.clip and args.clip != cfg["clip"]:
            raise CheckpointError(f"{path}: made for CLIP {cfg['clip']}, but --clip {args.clip} was requested")
        if args.layers and list(args.layers) != list(cfg["layers"]):
            raise CheckpointError(f"{path}: made for layers {cfg['layers']}, but --layers {args.layers} was requested")
        for key in ("clip", "pretrained", "clip_weights", "random_init", "layers", "clip_act"):
            if cfg.get(key) != first.get(key):
                raise CheckpointError(f"{path}: its {key} {cfg[key]} differs from {paths[0]}'s {first[key]}; an "
                                      f"ensemble must share one backbone")


def load_backbone(args, ckpts):
    """The frozen CLIP (once, for every checkpoint), its layers, and what the numbers depend on of it."""
    cfg = ckpts[0]["config"] if ckpts else dict(clip=args.clip or "ViT-L-14", pretrained="openai", clip_weights=None,
                                                random_init=args.random_init, layers=None, data=None)
    pretrained, weights = args.pretrained or cfg["pretrained"], args.clip_weights or cfg["clip_weights"]
    clip = encode.load_clip(cfg["clip"], pretrained, weights, cfg["random_init"])   # a weights file wins
    act, random_init = encode.clip_activation(clip), cfg["random_init"] and not weights
    if ckpts and cfg.get("clip_act", act) != act:  # the same tokens need the same activation (OpenAI: QuickGELU)
        raise CheckpointError(f"{args.ckpt[0]}: trained on CLIP {cfg['clip']} with {cfg['clip_act']}, but the weights "
                              f"given here build it with {act}; evaluate with the weights it was trained with")
    layers = cfg["layers"] or resolve_layers(args.layers, len(clip.visual.transformer.resblocks))
    backbone = dict(clip=cfg["clip"], activation=act, layers=layers, random_init=random_init,
                    weights="random" if random_init else
                    f"file {os.path.abspath(weights)}" if weights else f"open_clip tag {pretrained}",
                    weights_sha256=sha256(weights) if weights else None)
    return clip, layers, backbone


def load_detector(clip, layers, ckpt, path):
    det = mediclip.build_mediclip(clip, len(layers))
    if ckpt is not None:
        try:
            det.load_state_dict(ckpt["state_dicts"]["mediclip"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: its MediCLIP weights do not fit {ckpt['config']['clip']} "
                                  f"({str(e).splitlines()[0][:160]})")
    return det.eval()


def load_models(paths, args, device):
    """The checkpoints, the frozen CLIP (once, for all of them) with its layers and conditions, and one detector
    per checkpoint (CLIP's zero-shot detector when there is none), on the device."""
    ckpts = [load_checkpoint(p) for p in paths]
    if ckpts:
        check_request(ckpts, paths, args)
    clip, layers, backbone = load_backbone(args, ckpts)
    dets = [load_detector(clip, layers, c, p).to(device) for c, p in zip(ckpts, paths)] or \
           [load_detector(clip, layers, None, None).to(device)]
    prec = precision.pick(getattr(args, "precision", "auto"), device, clip)   # auto: timed once per machine
    print(prec["line"])
    backbone = dict(backbone, clip_forward="bf16" if prec["frozen"] else "fp32", precision=prec["line"])
    return ckpts, clip.to(device), layers, backbone, dets


def frozen_bf16(args, device, clip):
    """Whether the frozen CLIP forward runs in bf16 (--precision; auto: as precision.py measures this machine)."""
    return precision.pick(getattr(args, "precision", "auto"), device, clip)["frozen"]


@torch.inference_mode()
def predict(records, clip, dets, layers, args, device):
    """Anomaly maps (M, N, S, S) float16 and image scores (M, N) of M detectors on N records, and the masks
    (N, S, S); one frozen CLIP forward per batch serves every detector."""
    S = clip.visual.image_size if isinstance(clip.visual.image_size, int) else clip.visual.image_size[0]
    bf16 = frozen_bf16(args, device, clip)
    tokens_model = encode.CLIPTokens(clip, layers, torch.bfloat16 if bf16 else None)   # bf16: a cast, folded copy
    tower = mediclip.TextTower(clip)
    texts = [det.text_features(tower) for det in dets]             # (E, 2) each, once for all images
    autocast = bf16_autocast(device, bf16)
    maps, scores, masks = [[] for _ in dets], [[] for _ in dets], []
    for i in tqdm(range(0, len(records), args.batch_size), desc="evaluate", dynamic_ncols=True):
        images, m = data.load_images(records[i:i + args.batch_size], S)
        tokens = encode.encode_tokens(tokens_model, images.to(device), clip, len(images), autocast)
        for j, (det, text) in enumerate(zip(dets, texts)):
            probs = det(tokens, text, S)                            # (B, 2, S, S)
            scores[j].append(mediclip.image_scores(probs, args.topk).float().cpu())
            maps[j].append(probs[:, 1].half().cpu())
        masks.append(m[:, 0].bool())
    return (np.stack([torch.cat(m).numpy() for m in maps]), np.stack([torch.cat(s).numpy() for s in scores]),
            torch.cat(masks).numpy())


# ---------------------------------------------------------------------------------------------- main
def main(args):
    if not args.zero_shot and not args.ckpt:
        raise CheckpointError("give --ckpt FILE, or --zero-shot")
    if not 0 <= args.calib_split < 1 or (args.calib_split and args.images):
        raise ValueError("--calib-split takes a fraction in [0, 1) of a labelled test set (not --images)")
    if args.mood_out and not args.images:
        raise ValueError("--mood-out writes MOOD's files for the volumes of --images IN; give --images")
    for flag, least in (("batch_size", 1), ("overlays", 0), ("bootstrap", 0), ("topk", 0), ("slice_stride", 1)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    paths = [] if args.zero_shot else args.ckpt
    out = args.out or (os.path.dirname(os.path.abspath(paths[0])) if paths else "results")
    if args.images and not args.out:                   # own folders apart from the dataset's evaluation
        out = os.path.join(out, "images-" + exports.safe_name(os.path.basename(os.path.abspath(args.images))))
    check_writable(out, "--out")                       # before the compute, not after it
    clear_earlier(out, args.overwrite)
    cfg0 = load_checkpoint(paths[0])["config"] if paths else {}   # its scan options are needed before the model
    args.window = args.window or cfg0.get("window")
    args.slice_axis = args.slice_axis or cfg0.get("slice_axis") or "axial"
    skipped = []
    if args.images:                                    # listed and read before the model loads: fails in a second
        records, skipped = folders.own_images(args.images, data.scan_options(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpts, clip, layers, backbone, dets = load_models(paths, args, device)
    cfg = ckpts[0]["config"] if ckpts else {}
    if args.images:
        name = os.path.abspath(args.images)
    else:
        name = args.data or cfg.get("data") or "brainmri"
        records = data.load_split(name, args.data_root or cfg.get("data_root") or "data", "test",
                                  scan=data.scan_options(args))
    maps, member_scores, masks = predict(records, clip, dets, layers, args, device)   # (M, N, S, S), (M, N)
    if skipped:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "skipped.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("path", "reason")] + skipped)
        print(f"scored {len(records)} image(s); skipped {len(skipped)}, listed in {os.path.join(out, 'skipped.csv')}")
    return report.write_report(out, name, records, maps, member_scores, masks, ckpts, paths, backbone, args)


def clear_earlier(out, overwrite):
    """An earlier evaluation in `out` is refused in one line, or with --overwrite removed first (its files only:
    what report.EVALUATION_FILES, overlay_*.png and maps/ name), so that two runs never mix in one folder."""
    if not os.path.isdir(out):
        return
    earlier = [f for f in os.listdir(out) if f in report.EVALUATION_FILES or f.startswith("overlay_") or f == "maps"]
    if earlier and not overwrite:
        raise ValueError(f"--out {out}: holds an earlier evaluation ({', '.join(sorted(earlier)[:4])}"
                         f"{', ...' if len(earlier) > 4 else ''}); give another --out, or --overwrite to replace it")
    for f in earlier:
        path = os.path.join(out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (CheckpointError, data.DataError, encode.WeightsUnavailable, ValueError) as e:
        sys.exit(f"error: {e}")
