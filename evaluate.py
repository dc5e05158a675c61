"""
Evaluate a trained checkpoint (or CLIP zero-shot) on a test split. At test time a real image goes through the
frozen CLIP, the adapters and the prompts: an anomaly map and an image score (no MedVAE, no projection).

    python evaluate.py --ckpt runs/brainmri-k1-s0/run.pt                          # its own dataset's test split
    python evaluate.py --ckpt run.pt --data busi --data-root ../shared/data       # another dataset
    python evaluate.py --ckpt run.pt --images my_scans/                           # own images, no labels
    python evaluate.py --zero-shot --random-init --clip ViT-B-16 --data busi --data-root ../shared/data

Writes into --out (default: beside the checkpoint): metrics.json (image AUROC and AP; pixel AUROC, AP and
AUPRO where every anomalous image has a mask; the same per anomaly class), scores.csv (one row per image) and
a few overlays (image | anomaly map | mask) as PNG.
"""
import argparse
import csv
import json
import os
import pickle
import sys

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm import tqdm

import data
import encode
import mediclip
from train import FORMAT_VERSION, code_version, frozen_autocast, pick_device, resolve_layers


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, of another format or for another model."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a one-shot MediCLIP checkpoint (or CLIP zero-shot).")
    # data
    p.add_argument("--data", default=None, help="dataset to test on (default: the checkpoint's own)")
    p.add_argument("--data-root", default=None, help="folder that holds the datasets (default: the checkpoint's)")
    p.add_argument("--images", default=None, help="a folder of own images to score, without labels")
    # model
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py")
    p.add_argument("--zero-shot", action="store_true", help="no checkpoint: CLIP's zero-shot maps")
    p.add_argument("--clip", default=None, help="open_clip model (zero-shot; default ViT-L-14)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: the checkpoint's, openai)")
    p.add_argument("--clip-weights", default=None, help="local CLIP state-dict file")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="CLIP blocks (zero-shot; default as train.py)")
    p.add_argument("--random-init", action="store_true", help="random CLIP weights (zero-shot smoke runs only)")
    p.add_argument("--topk", type=int, default=0, help="image score: mean of the top-k map pixels (0: the max)")
    # run
    p.add_argument("--out", default=None, help="results folder (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.add_argument("--overlays", type=int, default=8, help="number of overlay PNGs to write")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    return p.parse_args(argv)


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: pickled objects are refused, never executed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, it holds pickled objects that weights_only loading does not "
                              f"allow ({str(e).splitlines()[-1][:120]})")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file "
                              f"({type(e).__name__})")
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "state_dicts" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ckpt['format_version']} is newer than this code's "
                              f"{FORMAT_VERSION}; update the code")
    return ckpt


def check_request(config, args, path):
    """Refuse a backbone or layer set other than the checkpoint's, rather than silently evaluate nonsense."""
    if args.clip and args.clip != config["clip"]:
        raise CheckpointError(f"{path}: made for CLIP {config['clip']}, but --clip {args.clip} was requested")
    if args.layers and list(args.layers) != list(config["layers"]):
        raise CheckpointError(f"{path}: made for layers {config['layers']}, but --layers {args.layers} was requested")


def build_model(args, ckpt):
    """CLIP + MediCLIP from the checkpoint alone (or zero-shot), and the conditions of the numbers."""
    if args.zero_shot:
        clip = encode.load_clip(args.clip or "ViT-L-14", args.pretrained or "openai", args.clip_weights,
                                args.random_init)
        layers = resolve_layers(args.layers, len(clip.visual.transformer.resblocks))
        det = mediclip.build_mediclip(clip, len(layers))
        cond = dict(checkpoint=None, clip=args.clip or "ViT-L-14", layers=layers, shots=0, seed=None, shot_files=[],
                    random_init=args.random_init, train_data=None)
    else:
        cfg = ckpt["config"]
        check_request(cfg, args, args.ckpt)
        clip = encode.load_clip(cfg["clip"], args.pretrained or cfg["pretrained"],
                                args.clip_weights or cfg["clip_weights"], cfg["random_init"])
        layers = cfg["layers"]
        det = mediclip.build_mediclip(clip, len(layers))
        try:
            det.load_state_dict(ckpt["state_dicts"]["mediclip"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{args.ckpt}: its MediCLIP weights do not fit {cfg['clip']} "
                                  f"({str(e).splitlines()[0][:160]})")
        cond = dict(checkpoint=os.path.abspath(args.ckpt), clip=cfg["clip"], layers=layers, shots=cfg["shots"],
                    seed=ckpt["seed"], shot_files=ckpt["shots"], random_init=cfg["random_init"],
                    train_data=cfg["data"], synth=cfg["synth"], steps=cfg["steps"])
    weights = args.clip_weights or (None if args.zero_shot else cfg["clip_weights"])
    cond["weights"] = ("random" if cond["random_init"] else
                       f"file {weights}" if weights else f"open_clip tag {args.pretrained or 'openai'}")
    return clip, det.eval(), layers, cond


@torch.inference_mode()
def predict(records, clip, det, layers, args, device):
    """Anomaly maps (N, S, S) float16 and image scores (N,) for the records, batched."""
    S = clip.visual.image_size if isinstance(clip.visual.image_size, int) else clip.visual.image_size[0]
    tokens_model = encode.CLIPTokens(clip, layers)
    text = det.text_features(encode.TextTower(clip))               # (E, 2), once for all images
    autocast = frozen_autocast(device)
    maps, scores, masks = [], [], []
    for i in tqdm(range(0, len(records), args.batch_size), desc="evaluate", dynamic_ncols=True):
        images, m = data.load_images(records[i:i + args.batch_size], S)
        tokens = encode.encode_tokens(tokens_model, images.to(device), clip, len(images), autocast)
        probs = det(tokens, text, S)                                # (B, 2, S, S)
        scores.append(mediclip.image_scores(probs, args.topk).float().cpu())
        maps.append(probs[:, 1].half().cpu())
        masks.append(m[:, 0].bool())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(masks).numpy()


def aupro(maps, masks, max_fpr=0.3):
    """Area under the per-region-overlap curve up to max_fpr, normalised to [0, 1] (Bergmann et al. 2021),
    for probability maps >= 0 (compared at float16 precision, as they are stored).
    Exact and O(N log N): after sorting pixels by score, the mean overlap over R regions at each threshold is
    the running sum of 1 / (R * |region|) over the anomalous pixels seen so far."""
    from scipy.ndimage import label
    regions, n = np.zeros(masks.shape, np.int32), 0
    for i, m in enumerate(masks):
        lab, k = label(m)
        regions[i] = np.where(lab > 0, lab + n, 0)
        n += k
    if n == 0:
        return float("nan")
    codes = maps.astype(np.float16).view(np.uint16).ravel()      # scores >= 0: bit order is score order
    order = np.argsort(codes, kind="stable")[::-1]                 # 16-bit keys: numpy uses a radix sort
    s, reg = codes[order], regions.ravel()[order]
    size = np.bincount(reg, minlength=n + 1)
    fpr = np.cumsum(reg == 0) / size[0]
    pro = np.cumsum(np.where(reg > 0, 1.0 / (n * size[reg]), 0.0))
    last = np.r_[s[1:] != s[:-1], True]                             # one point per distinct threshold
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    k = np.searchsorted(fpr, max_fpr, side="right")
    x, y = np.r_[fpr[:k], max_fpr], np.r_[pro[:k], np.interp(max_fpr, fpr, pro)]
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum() / max_fpr)


def image_metrics(scores, labels):
    return dict(auroc=float(roc_auc_score(labels, scores)), ap=float(average_precision_score(labels, scores)),
                n=int(len(labels)), n_anomalous=int(labels.sum()))


def count_pixels(maps, masks):
    """Maps are float16, so there are at most 65536 distinct scores: count (score, label) pairs once and hand
    sklearn the weighted points. Exact (ties are grouped by score either way) and ~100x faster on 37M pixels."""
    codes = maps.astype(np.float16).view(np.uint16).ravel()
    pos = np.bincount(codes[masks.ravel()], minlength=65536)
    neg = np.bincount(codes[~masks.ravel()], minlength=65536)
    values = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    y = np.r_[np.ones((pos > 0).sum()), np.zeros((neg > 0).sum())]
    return y, np.r_[values[pos > 0], values[neg > 0]], np.r_[pos[pos > 0], neg[neg > 0]]


def pixel_metrics(maps, masks):
    y, s, w = count_pixels(maps, masks)
    return dict(auroc=float(roc_auc_score(y, s, sample_weight=w)),
                ap=float(average_precision_score(y, s, sample_weight=w)), aupro=aupro(maps, masks))


def compute_metrics(records, maps, scores, masks):
    """Image metrics always; pixel metrics when every anomalous image has a mask; both per anomaly class."""
    labels = np.array([r["label"] for r in records])
    classes = np.array([r["cls"] for r in records])
    has_masks = all(r["mask_path"] is not None or r["mask"] is not None for r in records if r["label"] == 1)
    out = dict(image=image_metrics(scores, labels), pixel=pixel_metrics(maps, masks) if has_masks else None,
               per_class={})
    for c in sorted(set(classes[labels == 1])):
        keep = (labels == 0) | (classes == c)                       # the normals against one class
        out["per_class"][c] = dict(image=image_metrics(scores[keep], labels[keep]),
                                   pixel=pixel_metrics(maps[keep], masks[keep]) if has_masks else None)
    return out


def colourise(a):
    """(H, W) in [0, 1] -> (H, W, 3) uint8 on a black-red-yellow-white ramp."""
    ramp = np.array([[0, 0, 0], [128, 0, 0], [255, 64, 0], [255, 200, 0], [255, 255, 255]], np.float32)
    x = np.clip(a, 0, 1) * (len(ramp) - 1)
    return np.stack([np.interp(x, np.arange(len(ramp)), ramp[:, c]) for c in range(3)], -1).astype(np.uint8)


def write_overlay(path, image, amap, mask):
    """image | anomaly map (min-max over the image) | mask, side by side."""
    img = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    a = (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-8)
    heat = (0.5 * img + 0.5 * colourise(a)).astype(np.uint8)
    m = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    Image.fromarray(np.concatenate([img, heat, m], axis=1)).save(path)


def write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(args):
    if not args.zero_shot and not args.ckpt:
        raise CheckpointError("give --ckpt FILE, or --zero-shot")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt = None if args.zero_shot else load_checkpoint(args.ckpt)
    clip, det, layers, cond = build_model(args, ckpt)
    clip, det = clip.to(device), det.to(device)
    cfg = {} if args.zero_shot else ckpt["config"]
    if args.images:
        records, name = data.list_images(args.images), os.path.abspath(args.images)
    else:
        name = args.data or cfg.get("data") or "brainmri"
        records = data.load_split(name, args.data_root or cfg.get("data_root") or "data", "test")
    out = args.out or (os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt else "results")
    os.makedirs(out, exist_ok=True)

    maps, scores, masks = predict(records, clip, det, layers, args, device)

    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", "class", "score"])
        w.writerows([r["name"], r["label"], r["cls"], f"{s:.6f}"] for r, s in zip(records, scores))
    order = np.argsort(-scores, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, min(args.overlays, len(order))).round().astype(int)]
    for rank, i in enumerate(picks):
        image, _ = data.load_images([records[i]], maps.shape[-1])
        safe = records[i]["name"].replace("/", "_").replace("\\", "_")
        write_overlay(os.path.join(out, f"overlay_{rank:02d}_{safe}.png"), image[0], maps[i].astype(np.float32),
                      masks[i])
    print(f"wrote {out}/scores.csv and {len(picks)} overlays")
    if args.images:
        return None

    metrics = dict(dataset=name, split="test", **compute_metrics(records, maps, scores, masks),
                   conditions=dict(cond, image_score="max" if args.topk <= 0 else f"top{args.topk}",
                                   code_version=code_version()))
    if cond["random_init"]:
        metrics["warning"] = "random backbone weights: these numbers say nothing about the method"
    write_json(metrics, os.path.join(out, "metrics.json"))
    px = metrics["pixel"]
    print(f"image AUROC {metrics['image']['auroc']:.4f}  AP {metrics['image']['ap']:.4f}" +
          (f"  pixel AUROC {px['auroc']:.4f}  AUPRO {px['aupro']:.4f}" if px else "") +
          f"\nwrote {os.path.join(out, 'metrics.json')}")
    return metrics


if __name__ == "__main__":
    try:
        main(parse_args())
    except (CheckpointError, data.DataError, encode.WeightsUnavailable, ValueError) as e:
        sys.exit(f"error: {e}")
