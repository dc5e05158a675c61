"""
Datasets for one-shot medical anomaly detection.

Every split is a sorted list of plain dict records:
    {"name", "label" (0 normal / 1 anomalous / -1 unknown), "cls", "path", "mask_path", "image", "mask"}
("image"/"mask" arrays are only filled by the in-memory synthetic set.)

Usage:
    recs = load_split("busi", "/work/shared/data", "test")      # MediCLIP or MVFA layout, or "synthetic"
    shots = sample_shots(load_split("busi", root, "train"), k=1, seed=0)   # k studies, each a list of records
    x, m = load_images(recs, size=224)                           # (B,3,S,S) in [0,1], (B,1,S,S) in {0,1}
(the shots' augmented views are views.py's)

Layouts understood under <root>/<name>:
    MediCLIP: samples/{train,test}.json (one JSON object per line) + images/
    MVFA/BMAD: {valid,test}/{good,Ungood}/img/* with masks in Ungood/anomaly_mask/
Every bad input raises DataError with a one-line message that names the file and the problem.
"""

import difflib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import phantoms
import scans
import series

DATASETS = ("brainmri", "busi", "chexpert", "synthetic")
# where the public datasets come from: MediCLIP's data README packages each in the layout read here
MEDICLIP_DATA = "https://github.com/cnulab/MediCLIP/tree/main/data (its README links each dataset, packaged)"
SOURCES = {"brainmri": "Kaggle 'Brain MRI Images for Brain Tumor Detection' (navoneel)",
           "busi": "BUSI, Al-Dhabyani et al. 2020 (Cairo University)",
           "chexpert": "CheXpert (Stanford ML Group)"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 32  # anything smaller is a thumbnail or an icon, not a scan
MASK_DIRS = ("anomaly_mask", "label")  # MVFA renamed BMAD's "label" folder; accept both


class DataError(ValueError):
    """Bad input data; the message names the file and the problem on one line."""


def _record(name, label, cls, path=None, mask_path=None, image=None, mask=None, index=None, scan=None):
    """index: the frame or slice of a scan file (scans.py); scan: how to read it (slice axis, window)."""
    return {"name": name, "label": label, "cls": cls, "path": path, "mask_path": mask_path, "image": image,
            "mask": mask, "index": index, "scan": scan}


# skip_empty: only the slices of a volume that hold anatomy; stride: then every stride-th of them
SCAN_DEFAULTS = dict(axis="axial", window=None, skip_empty=True, stride=1)


def scan_options(args):
    """How DICOM and NIfTI files are read (data.scan_records): slice axis, window, which slices of a volume."""
    return dict(axis=args.slice_axis, window=tuple(args.window) if args.window else None,
                skip_empty=not getattr(args, "all_slices", False), stride=getattr(args, "slice_stride", 1))


def has_anatomy(img):
    """More than 1 % of the slice brighter than 5 % of the window: not air, not an empty end of the volume."""
    return (img > 0.05).mean() > 0.01


def select_slices(read, n, scan):
    """The indices of a volume's slices to score: with skip_empty those with anatomy, then every stride-th."""
    keep = [i for i in range(n) if has_anatomy(read(i))] if scan["skip_empty"] and n > 1 else list(range(n))
    return keep[::scan["stride"]]


def scan_records(path, name, label, cls, mask_path=None, scan=None):
    """One record per image a file holds: itself, or each frame of a multi-frame DICOM (FILE#f=K) or slice of
    a NIfTI volume (FILE#z=K for axial; by default only slices with anatomy in them, select_slices). An anomalous
    volume with a voxel mask labels each slice by its own mask (a slice without lesion is a normal slice); the
    study's label stays in "study_label"."""
    if not scans.is_scan(path):
        return [_record(name, label, cls, path, mask_path)]
    scan = dict(SCAN_DEFAULTS, **(scan or {}))
    try:
        n, letter = scans.count_images(path, scan["axis"])
        if scans.is_dicom(path) and min(size := scans.dicom_size(path)) < MIN_SIDE:   # one line per file
            raise DataError(f"{path}: {n} frame(s) of {size[1]}x{size[0]} px, smaller than {MIN_SIDE} px on a side")
        keep = range(n)
        if scans.is_nifti(path):
            keep = select_slices(lambda i: scans.read_scan(path, i, scan["axis"], scan["window"]), n, scan)
        labels = [label] * len(keep)
        if label == 1 and n > 1 and mask_path and scans.is_nifti(mask_path):
            labels = [int(scans.read_nifti_mask(mask_path, i, scan["axis"], path).any()) for i in keep]
    except scans.ScanError as e:
        raise DataError(str(e)) from None
    if not keep:
        raise DataError(f"{path}: none of its {n} slices holds anatomy (data.has_anatomy); --all-slices scores them")
    return [dict(_record(name if n == 1 else f"{name}#{letter}={i}", y, cls, path, mask_path, index=i, scan=scan),
                 study_label=label) for i, y in zip(keep, labels)]


def series_records(s, label, cls, scan=None):
    """One record per slice of a DICOM series (SERIES#z=K, K in order along the slice normal), selected as
    select_slices says; each carries the series (its files, identity and geometry: series.py)."""
    scan = dict(SCAN_DEFAULTS, **(scan or {}))
    try:
        keep = select_slices(lambda i: series.read_slice(s["files"], i, scan["window"]), len(s["files"]), scan)
    except scans.ScanError as e:
        raise DataError(str(e)) from None
    return [dict(_record(f"{s['name']}#z={i}", label, cls, s["files"][i], index=i, scan=scan), series=s)
            for i in keep]


def folder_records(folder, root, label, cls, scan=None):
    """The DICOM series in a folder given as one entry of a labelled split (MVFA's img/, a MediCLIP filename):
    its series' records; anything that is not one sound series fails, naming it."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if not f.startswith("."))
    found, singles, alone = series.find_series([p for p in paths if scans.is_dicom(p)], root)
    if singles or not found:
        why = alone[singles[0]] if singles and singles[0] in alone else \
            f"{singles[0] if singles else folder}: not part of a DICOM series of 2+ files"
        raise DataError(f"{folder}: listed as a study, but {why}")
    for s in found:
        for line in s["notes"]:
            print(f"note: {line}")
    return [r for s in found for r in series_records(s, label, cls, scan)]


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


# -----------------------------------------------------------------------------
# splits

def study_files(rec):
    """The files of a record's study: a DICOM series' every file (slices without anatomy too), else its own."""
    return rec["series"]["files"] if rec.get("series") else [rec["path"]] if rec.get("path") else []


def study_of(rec):
    """A record's study: its DICOM series, NIfTI volume or (multi-frame) file; a plain image is its own."""
    return rec["name"].split("#")[0]


def in_order(recs):
    """Records sorted by name, the frames and slices of one file by their number (z=2 before z=10)."""
    return sorted(recs, key=lambda r: (r["name"].split("#")[0], r.get("index") or 0, r["name"]))


def load_split(name, root, split, seed=0, scan=None):
    """The records of a split; DICOM and NIfTI files give a record per frame or slice, read as `scan` says
    (SCAN_DEFAULTS: axial slices, the file's own or a percentile window)."""
    if split not in ("train", "test"):
        raise DataError(f"{name}: split must be 'train' or 'test', got {split!r}")
    if name == "synthetic":
        recs = phantoms.synthetic_split(split, seed, _record)
    else:
        root = os.fspath(root)
        base = os.path.join(root, name)
        json_path = os.path.join(base, "samples", f"{split}.json")
        if os.path.isfile(json_path):
            recs = _mediclip(base, json_path, scan)
        elif _is_mvfa(base):
            recs = _mvfa(base, split, scan)
        elif not os.path.isdir(base):
            raise DataError(missing_dataset(name, root))
        else:
            raise DataError(f"{base}: no dataset here (looked for samples/{split}.json, an MVFA "
                            f"valid/test folder); named datasets: {', '.join(DATASETS)}")
        if not recs:
            raise DataError(f"{base}: split {split!r} is empty (no images listed or found)")
    return in_order(recs)


def missing_dataset(name, root):
    """Where a dataset that is not there comes from, where it goes, and the flag that points elsewhere."""
    where = f"{os.path.abspath(root)}" + ("" if os.path.isdir(root) else " (that folder does not exist)")
    there = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    names = [d for d in there + [d for d in SOURCES if d not in there] + ["synthetic"] if d != name]
    near = difflib.get_close_matches(name, names, 1, 0.6)
    if near:                        # a typo: say the nearest name first, the download story after
        return (f"{os.path.join(root, name)}: dataset {name!r} not found under the data root {where}; did you mean "
                f"{near[0]}?" + (f" (here: {', '.join(there)})" if there else ""))
    source = f"{SOURCES[name]}; get it from " if name in SOURCES else "MediCLIP-layout datasets: see "
    return (f"{os.path.join(root, name)}: dataset {name!r} not found under the data root {where}. {source}"
            f"{MEDICLIP_DATA}, unpack it as <root>/{name}/samples + images, and pass --data-root <root> "
            f"(or --data synthetic for a run that needs no download)")


def _mediclip(base, json_path, scan=None):
    images = os.path.join(base, "images")
    recs, seen = [], set()
    with open(json_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{json_path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON line ({e.msg})") from None
            if not isinstance(item, dict) or "filename" not in item or "label" not in item:
                raise DataError(f"{where}: line needs an object with 'filename' and 'label'")
            if item["label"] not in (0, 1):
                raise DataError(f"{where}: label must be 0 or 1, got {item['label']!r}")
            fn, label = item["filename"], int(item["label"])
            if fn in seen:  # names must be unique: they key scores and results
                raise DataError(f"{where}: duplicate filename {fn}")
            seen.add(fn)
            # check existence now: a missing file should fail at load time, not mid-evaluation
            path = os.path.join(images, fn)
            mask = os.path.join(images, item["mask"]) if item.get("mask") else None
            for p in (path, mask):
                if p is not None and not os.path.isfile(p) and not (p == path and os.path.isdir(p)):
                    raise DataError(f"{p}: listed in {where} but missing")
            cls = item.get("clsname") or ("normal" if label == 0 else "abnormal")
            recs.extend(folder_records(path, images, label, cls, scan) if os.path.isdir(path) else
                        scan_records(path, fn, label, cls, mask, scan))
    return recs


def _is_mvfa(base):
    return any(os.path.isdir(os.path.join(base, s, g))
               for s in ("valid", "test") for g in ("good", "Ungood"))


def _image_files(folder):
    """Image and scan files, and folders (DICOM series), directly inside folder (not recursive), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and
                  (f.lower().endswith(IMAGE_EXTS) or os.path.isdir(os.path.join(folder, f)) or
                   scans.is_scan(os.path.join(folder, f))))


def _mvfa(base, split, scan=None):
    parts = [("valid", "good", 0, "normal")] if split == "train" else \
            [("test", "good", 0, "normal"), ("test", "Ungood", 1, "abnormal")]
    recs = []
    for sub, group, label, cls in parts:
        gdir = os.path.join(base, sub, group)
        img_dir = os.path.join(gdir, "img") if os.path.isdir(os.path.join(gdir, "img")) else gdir
        for fn in _image_files(img_dir):
            path = os.path.join(img_dir, fn)
            masks = [os.path.join(gdir, d, fn) for d in MASK_DIRS] if label == 1 else []
            mask = next((m for m in masks if os.path.isfile(m)), None)
            name = os.path.relpath(path, base).replace(os.sep, "/")
            recs.extend(folder_records(path, base, label, cls, scan) if os.path.isdir(path) else
                        scan_records(path, name, label, cls, mask, scan))
    return recs


def sample_shots(records, k, seed):
    """k normal studies (every record of the study label 0; a plain image is a study of one), drawn from seed:
    a list of k lists of records."""
    studies = {}
    for r in records:
        studies.setdefault(study_of(r), []).append(r)
    pool = sorted(name for name, recs in studies.items() if all(r.get("study_label", r["label"]) == 0 for r in recs))
    if not 1 <= k <= len(pool):
        paths = [os.path.dirname(r["path"]) for r in records if r.get("path")]
        src = f" from {os.path.commonpath(paths)}" if paths else ""
        raise DataError(f"--shots {k}, but there are {len(pool)} normal (label-0) studies among the {len(studies)} "
                        f"given{src}")
    idx = np.random.default_rng(seed).choice(len(pool), k, replace=False)
    return [in_order(studies[pool[i]]) for i in idx]


# -----------------------------------------------------------------------------
# reading pixels

def _array_to_rgb(a, src):
    a = np.asarray(a)
    a = (a / 255.0 if a.dtype == np.uint8 else a).astype(np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"{src}: image array has shape {a.shape}, expected (H, W) or (H, W, 3)")
    return np.clip(a, 0, 1)


def _pil_to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # high bit-depth scans have arbitrary ranges: scale each image to its own min..max
        a = np.nan_to_num(np.array(im).astype(np.float32))
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        # composite on black so transparent pixels become background, not their hidden colour
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _open(path, what):
    """Open, fully decode and EXIF-orient an image file; every failure becomes a DataError."""
    if not path or not os.path.isfile(path):
        raise DataError(f"{path}: {what} file does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: {what} file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # force a full decode so truncated files fail here, not later
            return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable {what} ({_one_line(e)})") from None


def read_image(rec):
    if rec.get("image") is not None:
        src = rec["name"]
        img = _array_to_rgb(rec["image"], src)
    elif rec.get("series") is not None:                # a slice of a DICOM series, windowed with its volume
        src, scan = rec["path"], rec["scan"]
        try:
            img = _array_to_rgb(series.read_slice(rec["series"]["files"], rec["index"], scan["window"]), src)
        except scans.ScanError as e:
            raise DataError(str(e)) from None
    elif rec.get("index") is not None:                 # a DICOM frame or a NIfTI slice
        src, scan = rec["path"], rec["scan"]
        try:
            img = _array_to_rgb(scans.read_scan(src, rec["index"], scan["axis"], scan["window"]), src)
        except scans.ScanError as e:
            raise DataError(str(e)) from None
    else:
        src = rec.get("path")
        im = _open(src, "image")
        try:
            img = _pil_to_rgb(im)
        except (OSError, ValueError) as e:  # exotic modes PIL cannot convert
            raise DataError(f"{src}: cannot convert {im.mode} image to RGB ({_one_line(e)})") from None
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{src}: image is {w}x{h} px, smaller than {MIN_SIDE} px on a side")
    return img


def has_mask(rec):
    """Whether the record has a ground-truth mask (a file, or the synthetic set's array)."""
    return bool(rec.get("mask_path")) or rec.get("mask") is not None


def read_mask(rec, hw):
    hw = tuple(int(s) for s in hw)
    if rec.get("mask") is not None:
        src, m = rec["name"], np.asarray(rec["mask"])
        m = m > 127 if m.dtype == np.uint8 else m > 0.5
    elif rec.get("mask_path") and scans.is_nifti(rec["mask_path"]):
        src = rec["mask_path"]
        try:
            m = scans.read_nifti_mask(src, rec["index"] or 0, (rec["scan"] or SCAN_DEFAULTS)["axis"], rec["path"])
        except scans.ScanError as e:
            raise DataError(str(e)) from None
    elif rec.get("mask_path"):
        src = rec["mask_path"]
        # JPEG masks carry grey ringing around the edge: threshold at mid-grey
        m = np.asarray(_open(src, "mask").convert("L")) > 127
    else:
        return np.zeros(hw, dtype=bool)
    if m.shape != hw:
        raise DataError(f"{src}: mask is {m.shape[1]}x{m.shape[0]} but its image is {hw[1]}x{hw[0]} (WxH)")
    return m


def load_images(records, size):
    if not records:
        raise DataError("load_images: no records given")
    xs, ms = [], []
    for rec in records:
        img = read_image(rec)
        m = torch.from_numpy(read_mask(rec, img.shape[:2])).float()[None, None]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        xs.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        # nearest-exact samples pixel centres like PIL's NEAREST (plain "nearest" shifts by half a pixel)
        ms.append(F.interpolate(m, size=(size, size), mode="nearest-exact"))
    return torch.cat(xs).clamp(0, 1), torch.cat(ms)
