"""
The files evaluate.py writes besides metrics.json, for people and for other tools: scores.csv (one row per
image, with anomalib's per-image fields), the overlays (image | anomaly map | mask), and the anomaly-map export
of --save-maps (one .npz per image, or one NIfTI volume per NIfTI input, on its own grid).

    import exports
    exports.write_scores("scores.csv", records, member_scores, probs, thresholds, fit)
    exports.save_maps("out", records, maps, scores, probs)
"""
import csv
import os

import numpy as np
import torch
from PIL import Image

import data
import scans


def colourise(a):
    """(H, W) in [0, 1] -> (H, W, 3) uint8 on a black-red-yellow-white ramp."""
    ramp = np.array([[0, 0, 0], [128, 0, 0], [255, 64, 0], [255, 200, 0], [255, 255, 255]], np.float32)
    x = np.clip(a, 0, 1) * (len(ramp) - 1)
    return np.stack([np.interp(x, np.arange(len(ramp)), ramp[:, c]) for c in range(3)], -1).astype(np.uint8)


def safe_name(name):
    """A file name for a record's outputs: folders flattened, the image extension dropped, a slice kept
    (test/a.png -> test_a; vol.nii.gz#z=3 -> vol_z3)."""
    base, _, part = name.partition("#")
    for ext in (".nii.gz",) + data.IMAGE_EXTS + scans.NIFTI_EXTS + scans.DICOM_EXTS:
        if base.lower().endswith(ext):
            base = base[:-len(ext)]
            break
    return (base + (f"_{part.replace('=', '')}" if part else "")).replace("/", "_").replace("\\", "_")


def save_maps(out, records, amaps, scores, probs):
    """--save-maps, as anomalib exports predictions: per input maps/<name>.npz with anomaly_map in the input's
    own pixel size, pred_score, gt_label (and gt_mask where there is one); the slices of a NIfTI volume go
    together into maps/<file>.nii.gz on the volume's own grid and affine, to overlay in ITK-SNAP or 3D Slicer."""
    folder = os.path.join(out, "maps")
    os.makedirs(folder, exist_ok=True)
    volumes = {}
    for i, r in enumerate(records):
        if r.get("index") is not None and scans.is_nifti(r["path"]):
            volumes.setdefault(r["path"], []).append(i)
            continue
        h, w = data.read_image(r).shape[:2]
        amap = resize(amaps[i], (h, w))
        extra = dict(gt_mask=data.read_mask(r, (h, w))) if data.has_mask(r) else {}
        np.savez_compressed(os.path.join(folder, safe_name(r["name"]) + ".npz"), anomaly_map=amap,
                            pred_score=probs[i] if probs is not None else scores[i], gt_label=r["label"], **extra)
    for path, idx in volumes.items():
        write_nifti_map(path, [(records[i]["index"], amaps[i]) for i in idx], records[idx[0]]["scan"]["axis"],
                               os.path.join(folder, safe_name(os.path.basename(path)) + ".nii.gz"))
    print(f"wrote {len(records)} anomaly map(s) into {folder}")


def resize(amap, hw):
    """A float16 (S, S) map bilinearly to (H, W) float32."""
    t = torch.from_numpy(amap.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def fit_side(h, w, side=320):
    """(H, W) scaled so that the longer side is `side` px: the image's own aspect ratio, never squashed."""
    k = side / max(h, w)
    return max(1, round(h * k)), max(1, round(w * k))


def write_overlay(path, image, amap, mask, scale, caption, sides=None):
    """image | anomaly map over it | mask, in the image's own aspect ratio, a caption line (score, probability,
    call, truth) and a colour bar. scale (lo, hi): one range for every overlay of a run, so that a normal image's
    map is as cool as its values are, not stretched to its own max. image (H, W, 3) in [0, 1]; amap (S, S);
    mask (S, S) or None (a grey panel saying there is none). sides: the patient directions at the image's left and
    right edges, e.g. ("R", "L") for a volume slice (display_sides), marked on the image and map panels."""
    from PIL import ImageDraw
    h, w = fit_side(*image.shape[:2])
    img = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    a = (resize(amap, (h, w)) - scale[0]) / max(scale[1] - scale[0], 1e-8)
    heat = (0.5 * img + 0.5 * colourise(a)).astype(np.uint8)
    if mask is None:  # not "ground truth: nothing", which an all-black panel would say
        panel = Image.new("RGB", (w, h), (96, 96, 96))
        ImageDraw.Draw(panel).text((w // 2, h // 2), "no mask", fill=(255, 255, 255), anchor="mm")
        m = np.asarray(panel)
    else:
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST))
        m = np.repeat(m[..., None], 3, axis=-1)
    bar = colourise(np.linspace(1, 0, h)[:, None].repeat(16, 1))                            # (h, 16, 3)
    body = np.concatenate([img, heat, m, np.full((h, 8, 3), 255, np.uint8), bar], axis=1)
    canvas = Image.new("RGB", (body.shape[1] + 64, h + 36), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (0, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), caption, fill=(0, 0, 0))
    draw.text((4, 16), f"map colours: one scale for the whole run, [{scale[0]:.3f}, {scale[1]:.3f}] "
              f"(the run's map values, low to high)", fill=(90, 90, 90))
    for left in (0, w) if sides else ():                  # the patient's sides on the image and map panels
        draw.text((left + 3, 30 + h // 2), sides[0], fill=(255, 255, 0), anchor="lm")
        draw.text((left + w - 3, 30 + h // 2), sides[1], fill=(255, 255, 0), anchor="rm")
    x = body.shape[1] + 3
    for frac, value in ((0, scale[1]), (0.5, (scale[0] + scale[1]) / 2), (1, scale[0])):
        draw.text((x, 30 + min(int(frac * h), h - 10)), f"{value:.3f}", fill=(0, 0, 0))
    canvas.save(path)


def overlay_caption(score, prob, label, threshold=0.5):
    """One line for an overlay: the image's score, its probability and the call at p >= 0.5, and the truth."""
    truth = {0: "normal", 1: "anomalous"}.get(int(label), "unknown")
    if prob is None:
        return f"score {score:.4f} (uncalibrated: no probability, no call) | truth: {truth}"
    call = "anomalous" if prob >= threshold else "normal"
    return f"score {score:.4f} | P(anomalous) {prob:.3f} | call: {call} (p >= {threshold:g}) | truth: {truth}"


def write_scores(path, records, member_scores, probs, thresholds, fit):
    """One row per image: the (mean) score, its spread over checkpoints, the calibrated probability, the call at
    each operating point, each checkpoint's score, and whether the image was used to fit the calibration; then
    anomalib's per-image fields: pred_score (the probability, else the score), pred_label (p >= 0.5), gt_label."""
    M = len(member_scores)
    head = ["name", "label", "class", "score"] + (["score_std"] if M > 1 else []) + \
           (["probability"] if probs is not None else []) + [f"anomalous@{k}" for k in thresholds] + \
           ([f"score_{j}" for j in range(M)] if M > 1 else []) + (["calibration_fit"] if fit.any() else []) + \
           ["pred_score", "pred_label", "gt_label"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for i, r in enumerate(records):
            s = member_scores[:, i]
            w.writerow([r["name"], r["label"], r["cls"], f"{s.mean():.6f}"]
                       + ([f"{s.std(ddof=1):.6f}"] if M > 1 else [])
                       + ([f"{probs[i]:.6f}"] if probs is not None else [])
                       + [int(probs[i] >= t) for t in thresholds.values()]
                       + ([f"{x:.6f}" for x in s] if M > 1 else []) + ([int(fit[i])] if fit.any() else [])
                       + [f"{probs[i] if probs is not None else s.mean():.6f}",
                          int(probs[i] >= 0.5) if probs is not None else "", r["label"] if r["label"] >= 0 else ""])


def display_sides(rec):
    """The patient directions at the left and right edges of a volume slice as shown (nifti_slice, or a DICOM
    series as stored: its row direction cosine), e.g. ("R", "L"); None for a plain image."""
    if rec.get("series"):
        ds = scans.read_dicom_header(rec["series"]["files"][0])
        try:
            row = [float(v) for v in ds.ImageOrientationPatient][:3]          # +column direction, in LPS
        except (AttributeError, TypeError, ValueError):
            return None
        k = int(np.argmax(np.abs(row)))
        toward = "LPS"[k] if row[k] > 0 else "RAI"[k]              # where the image's columns run, in LPS
        return {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}[toward], toward
    if rec.get("path") and scans.is_nifti(rec["path"]) and rec.get("index") is not None:
        return ("A", "P") if rec["scan"]["axis"] == "sagittal" else ("R", "L")
    return None


def write_nifti_map(path, slices, axis, out):
    """Anomaly maps of slices of the NIfTI at `path` ([(index, (S, S) map)]) as one volume on that file's own
    grid and affine (undoing the display rotation and the canonical reorientation); slices not given are 0."""
    import nibabel as nib
    original, canonical = scans.load_raw(path), scans.load_nifti(path)
    shape = canonical.shape[:3] + (1,) * (3 - len(canonical.shape))
    a = scans.AXES[axis] if shape[2] > 1 else 2
    volume = np.zeros(shape, np.float32)
    for index, amap in slices:
        plane = [s for i, s in enumerate(shape) if i != a]                       # the slice's (rows, cols) before rot90
        t = torch.from_numpy(amap.astype(np.float32))[None, None]
        shown = torch.nn.functional.interpolate(t, size=(plane[1], plane[0]), mode="bilinear")[0, 0].numpy()
        idx = [slice(None)] * 3
        idx[a] = index
        volume[tuple(idx)] = np.rot90(np.fliplr(shown), k=-1)                    # back from the display (scans.nifti_slice)
    back = nib.orientations.ornt_transform(nib.orientations.io_orientation(canonical.affine),
                                           nib.orientations.io_orientation(original.affine))
    volume = nib.orientations.apply_orientation(volume, back).reshape(original.shape[:3])
    nib.save(nib.Nifti1Image(volume, original.affine), out)
