"""
Studies, not slices: a DICOM series, a NIfTI volume or a DICOM file is one study, and a plain image is one too.
From the maps of a study's scored slices: a study score, the slice where it peaks, a call, studies.csv, study-level
image metrics, a map volume on the study's own grid, and MOOD's file interface (Zimmerer et al., MICCAI MOOD).

Study score (evaluate.py --study-score):
  max (default)  the largest slice score: with --topk 0 the largest voxel of the stacked 3D map. The image score's
                 own rule carried to the volume (a study is as anomalous as its most anomalous slice), the rule of
                 MOOD's sample-level examples, and the only one whose call matches the slices' calls exactly (a
                 study is called when any slice is).
  top-voxels     the mean of the top 0.1 % voxels of the stacked map (at least 10): one hot pixel cannot decide,
                 at the price of small lesions that cover fewer voxels than that.
Calibration: the few-shot Platt fit is of single images. The max over N slices of a normal study lies above a
normal slice's score, more so the more slices, so a slice probability is not a study probability: studies.csv
then gives none, and the call is "a scored slice at or over the slices' p >= 0.5". With --calib-split the split
is by study (no study on both sides) and Platt is fitted on the study scores of the fit studies: a study's own.

    import studies
    groups = studies.group(records)                               # [(study, slice indices)]
    score, peak = studies.study_scores(maps, scores, groups, "max")
"""
import csv
import os

import numpy as np

import calibration
import data
import exports
import metrics
import scans
import series

RULES = ("max", "top-voxels")
TOP_FRACTION, TOP_LEAST = 0.001, 10


def group(records):
    """[(study name, array of record indices)] in the records' order (data.in_order keeps a study together)."""
    out = {}
    for i, r in enumerate(records):
        out.setdefault(data.study_of(r), []).append(i)
    return [(name, np.array(idx)) for name, idx in out.items()]


def study_scores(maps, scores, groups, rule="max"):
    """(G,) study scores and (G,) record index of the slice each peaks on; maps (N, S, S), scores (N,)."""
    out, peak = np.zeros(len(groups)), np.zeros(len(groups), int)
    for g, (_, idx) in enumerate(groups):
        if rule == "max":
            out[g], peak[g] = scores[idx].max(), idx[np.argmax(scores[idx])]
        elif rule == "top-voxels":
            v = maps[idx].reshape(-1).astype(np.float32)
            k = min(len(v), max(TOP_LEAST, int(TOP_FRACTION * len(v))))
            out[g] = np.partition(v, len(v) - k)[-k:].mean()
            peak[g] = idx[np.argmax(maps[idx].reshape(len(idx), -1).max(1))]
        else:
            raise ValueError(f"--study-score must be one of {RULES}, got {rule!r}")
    return out, peak


def study_labels(records, groups):
    """A study's own label where its records carry it (a volume with a voxel mask labels its slices one by one),
    else anomalous when any of its records is; unknown (-1) when any is unknown."""
    labels = np.array([r.get("study_label", r["label"]) for r in records])
    return np.array([-1 if (labels[idx] < 0).any() else labels[idx].max() for _, idx in groups])


def split_by_study(records, groups, frac, seed):
    """--calib-split on studies: a stratified fraction of the studies, as a mask over the records."""
    fit_study = calibration.split_for_calibration(study_labels(records, groups), frac, seed)
    fit = np.zeros(len(records), bool)
    for (_, idx), f in zip(groups, fit_study):
        fit[idx] = f
    return fit, fit_study


def identity(rec):
    """What names a study: its kind, its files (';'-joined) and, for a DICOM series, its UID, patient and date."""
    s, files = rec.get("series"), ";".join(data.study_files(rec))
    if s:
        return dict(kind="dicom series", series_uid=s["uid"], patient_id=s["patient_id"], study_date=s["study_date"],
                    notes="; ".join(s["notes"]), files=files)
    kind = "nifti volume" if rec.get("path") and scans.is_nifti(rec["path"]) else \
        "dicom file" if rec.get("index") is not None else "image"
    return dict(kind=kind, series_uid="", patient_id="", study_date="", notes=rec.get("note", ""), files=files)


def write_map_volume(records, idx, amaps, out):
    """The map volume of a NIfTI or series study on its own grid (slices not scored: 0); None for 2D studies and
    for a series acquired with a tilted gantry (series.tilt_note says so in the study's notes)."""
    rec = records[idx[0]]
    if rec.get("series", {}).get("tilted"):
        return None
    slices = [(records[i]["index"], amaps[i]) for i in idx]
    if rec.get("series") or (rec.get("path") and scans.is_nifti(rec["path"]) and rec.get("index") is not None):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if rec.get("series"):
        series.write_map_volume(rec["series"], slices, out)
    elif rec.get("path") and scans.is_nifti(rec["path"]) and rec.get("index") is not None:
        exports.write_nifti_map(rec["path"], slices, rec["scan"]["axis"], out)
    else:
        return None
    return out


def write_studies(path, rows):
    """studies.csv: a header and one row per study."""
    keys = ["study", "kind", "series_uid", "patient_id", "study_date", "slices_scored", "score", "probability",
            "call", "peak_slice", "label", "map", "notes", "files"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def verdicts(out, records, amaps, scores, probs, fit, args):
    """studies.csv and the map volumes (out/maps/), from the slices' (mean) maps, scores and calibrated
    probabilities; returns the groups, study scores, labels, which studies were fit on, and their probabilities."""
    groups = group(records)
    score, peak = study_scores(amaps, scores, groups, args.study_score)
    labels = study_labels(records, groups)
    fit_study = np.array([fit[idx].all() for _, idx in groups])
    p = None
    if args.calib_split:                                    # the studies' own calibration (see the docstring)
        p = calibration.apply_platt(score, calibration.fit_platt(score[fit_study], labels[fit_study]))
    rows = []
    for g, (name, idx) in enumerate(groups):
        written = write_map_volume(records, idx, amaps, os.path.join(out, "maps", exports.safe_name(name) + ".nii.gz"))
        call = int(p[g] >= 0.5) if p is not None else "" if probs is None else int((probs[idx] >= 0.5).any())
        rows.append(dict(study=name, **identity(records[idx[0]]), slices_scored=len(idx), score=f"{score[g]:.6f}",
                         probability="" if p is None else f"{p[g]:.6f}", call=call,
                         peak_slice=records[peak[g]]["name"], label=labels[g],
                         map=os.path.relpath(written, out) if written else ""))
    write_studies(os.path.join(out, "studies.csv"), rows)
    return groups, score, labels, fit_study, p


def study_metrics(score, labels, classes, keep, n_boot, seed):
    """Image metrics over studies (those not used for --calib-split), with the slices' CIs and conditions."""
    recs = [dict(label=int(y), cls=c) for y, c in zip(labels[keep], classes[keep])]
    m = metrics.compute_metrics(recs, np.zeros((len(recs), 1, 1)), score[keep], np.zeros((len(recs), 1, 1), bool),
                                n_boot, seed)
    return dict(studies=len(recs), image_AUROC=m["image"]["auroc"], image_AUROC_ci95=m["image"].get("auroc_ci95"),
                image_AP=m["image"]["ap"], per_class={c: d["image"] for c, d in m["per_class"].items()})


def mood_export(out, task, records, groups, score, amaps):
    """MOOD's interface for the NIfTI studies: OUT/<name>.txt (sample: one score in [0, 1]) or OUT/<name> (pixel:
    voxel scores in [0, 1], the input's shape and affine, 0 on slices not scored). Returns the files written."""
    os.makedirs(out, exist_ok=True)
    written = []
    for (name, idx), s in zip(groups, score):
        rec = records[idx[0]]
        if not (rec.get("path") and scans.is_nifti(rec["path"])):
            continue
        base = os.path.join(out, os.path.basename(rec["path"]))
        if task == "sample":
            with open(base + ".txt", "w") as f:
                f.write(f"{float(np.clip(s, 0, 1)):.6f}\n")
            written.append(base + ".txt")
        else:
            written.append(write_map_volume(records, idx, amaps, base))     # softmax maps: in [0, 1]
    return written
