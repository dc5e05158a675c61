"""
DICOM series: the files of one acquisition (one SeriesInstanceUID), under any names and in any folders, read as
one volume, the way PACS exports and public archives (TCIA) deliver CT and MR.

- grouped by SeriesInstanceUID: several series in one folder are kept apart, one series across folders is joined;
  multi-frame files, one-file series and non-image objects stay single files (scans.py)
- ordered along the slice normal n = row cosine x column cosine (ImageOrientationPatient) by ImagePositionPatient . n,
  as ITK/GDCM and dicom2nifti do; without positions, by InstanceNumber (said)
- named by their folder (relative to the listed root), FOLDER@SeriesNumber (else @SeriesInstanceUID) when a
  folder holds several
- checked, each finding in one line naming the series: mixed image sizes (the majority size is the volume; the
  other files, a localiser filed in the series, are scored on their own), a gap wider than 1.5x the median
  spacing (read as it is: each slice is scored in 2D; the map volume's affine assumes the median spacing there).
  A series that cannot be one volume (mixed orientations, no order, two files at one position, a slice that
  cannot be decoded) is not dropped: each of its files is scored on its own, with a line saying why
- windowed as one volume, every slice on one scale (like a NIfTI volume): --window, else the first file's
  WindowCenter/WindowWidth, else the volume's 0.5-99.5 percentiles; MONOCHROME1 inverted

    import series
    found, singles, alone = series.find_series(paths, root)   # [series dict], other files, {file: why alone}
    img = series.read_slice(s["files"], k)             # (H, W) in [0, 1], the k-th slice along the normal
"""
import functools
import os

import numpy as np

import scans

GAP = 1.5            # a spacing this many times the median is a gap (a missing slice)


def read_headers(paths):
    """(path, header) of the single-frame grey DICOM images among paths, which may form series; the rest (other
    DICOM objects, colour or multi-frame files, unreadable headers) are read one by one, where scans.py says why."""
    heads, rest = [], []
    for p in paths:
        try:
            ds = scans.read_dicom_header(p)
        except scans.ScanError:
            rest.append(p)                           # scans.count_images says why, in its own line
            continue
        grey = scans.header_int(ds, "NumberOfFrames", 1) == 1 and scans.header_int(ds, "SamplesPerPixel", 1) == 1
        if grey and scans.not_an_image(ds) is None and ds.get("SeriesInstanceUID"):
            heads.append((p, ds))
        else:
            rest.append(p)
    return heads, rest


IMAGE_PARTS = {"M": "magnitude", "MAGNITUDE": "magnitude", "P": "phase", "PHASE": "phase", "R": "real",
               "REAL": "real", "I": "imaginary", "IMAGINARY": "imaginary"}


def part_of(ds):
    """What splits one SeriesInstanceUID into volumes, as dcm2niix splits it: the echo (EchoNumbers) and the
    magnitude / phase / real / imaginary part (ImageType); () for a plain series."""
    echo = str(ds.get("EchoNumbers", "") or "").strip()
    kind = next((IMAGE_PARTS[t.upper()] for t in ds.get("ImageType", []) or [] if str(t).upper() in IMAGE_PARTS), "")
    return tuple(x for x in (f"echo{echo}" if echo else "", kind) if x)


def numbers(value, n):
    """A multi-valued DS (n numbers) as floats, or None when absent or malformed."""
    try:
        v = [float(x) for x in value]
    except (TypeError, ValueError):
        return None
    return v if len(v) == n else None


def slice_normal(ds):
    iop = np.asarray(numbers(ds.ImageOrientationPatient, 6))
    return np.cross(iop[:3], iop[3:])


def order_series(heads, name):
    """heads of one series -> (ordered heads, positions along the normal, notes, the files left out of it with
    why). Ordered heads None (and the reason as the last note) when the files cannot be one volume soundly:
    the caller then scores each file on its own."""
    notes, left = [], []
    sizes = [(scans.header_int(ds, "Rows"), scans.header_int(ds, "Columns")) for _, ds in heads]
    size = max(set(sizes), key=sizes.count)
    if len(set(sizes)) > 1:   # a localiser filed in the series: it is scored on its own, not lost
        notes.append(f"{name}: mixed image sizes {sorted(set(sizes))}; the {sizes.count(size)} file(s) of "
                     f"{size[1]}x{size[0]} are the volume, the others are scored on their own")
        left = [(p, f"{p}: {s[1]}x{s[0]} px in a series of {size[1]}x{size[0]} slices ({name}): scored on its own")
                for (p, _), s in zip(heads, sizes) if s != size]
        heads = [h for h, s in zip(heads, sizes) if s == size]
    iops = [numbers(ds.get("ImageOrientationPatient"), 6) for _, ds in heads]
    ipps = [numbers(ds.get("ImagePositionPatient"), 3) for _, ds in heads]
    if all(v is not None for v in iops + ipps):
        if not np.allclose(iops, iops[0], atol=1e-3):
            return None, None, notes + [f"slices of different orientations in series {name}"], left
        pos = np.asarray(ipps) @ slice_normal(heads[0][1])
    else:
        pos = [scans.header_int(ds, "InstanceNumber") for _, ds in heads]
        if any(v is None for v in pos):
            return None, None, notes + [f"series {name} has neither a readable ImagePositionPatient nor an "
                                        f"InstanceNumber in every file, so its slices have no order"], left
        notes.append(f"{name}: no ImagePositionPatient; slices ordered by InstanceNumber")
        pos = np.asarray(pos, dtype=np.float64)
    order = np.argsort(pos, kind="stable")
    heads, pos = [heads[i] for i in order], pos[order]
    dup = np.r_[False, np.diff(pos) < 1e-3]
    if dup.any():   # the same slice twice (copies, other encodings, echoes): no sound volume
        return None, None, notes + [f"{int(dup.sum()) + 1} files of series {name} share a slice position (e.g. "
                                    f"{os.path.basename(heads[int(np.argmax(dup))][0])})"], left
    return heads, pos, notes, left


def gap_note(pos, name):
    """One line when a spacing is wider than GAP x the median (a missing slice), else None."""
    if pos is None or len(pos) < 3:
        return None
    d = np.diff(pos)
    big = np.flatnonzero(d > GAP * np.median(d))
    if not len(big):
        return None
    return (f"{name}: {len(big)} gap(s) in the slice positions (e.g. {d[big[0]]:.2f} mm after slice {big[0]}, median "
            f"spacing {np.median(d):.2f} mm): a missing slice? read as it is, each slice scored on its own")


def describe(heads, pos, name, folder):
    """The plain dict of one ordered series: files in order, what identifies it, its geometry."""
    ds = heads[0][1]
    return dict(name=name, folder=folder, uid=str(ds.SeriesInstanceUID), files=tuple(p for p, _ in heads),
                patient_id=str(ds.get("PatientID", "")), study_date=str(ds.get("StudyDate", "")),
                description=str(ds.get("SeriesDescription", "")), affine=series_affine(heads, pos))


def find_series(paths, root):
    """The DICOM series among paths (2 or more files of one SeriesInstanceUID; names relative to root), the
    paths that are no series, and {path: one line} for the files among those that belong to a series that cannot
    be read as a volume (each is scored on its own; the line says why it is not a volume). What was found odd in
    a series that is read goes into its "notes"."""
    heads, singles = read_headers(paths)
    groups = {}                                      # (SeriesInstanceUID, echo / magnitude-phase part) -> files
    for p, ds in heads:
        groups.setdefault((str(ds.SeriesInstanceUID), part_of(ds)), []).append((p, ds))
    for key in [k for k, hs in groups.items() if len(hs) == 1]:
        singles.append(groups.pop(key)[0][0])                    # a one-file series is a plain image
    parts = {}
    for uid, part in groups:
        parts.setdefault(uid, []).append(part)
    folders = {}
    for key, hs in groups.items():
        folder = os.path.relpath(os.path.commonpath([os.path.dirname(p) for p, _ in hs]), root).replace(os.sep, "/")
        folders.setdefault(folder, []).append(key)
    found, alone = [], {}
    for folder, keys in sorted(folders.items()):
        series_no = {k[0]: str(groups[k][0][1].get("SeriesNumber", "") or "") for k in keys}   # uid -> number
        for uid, part in keys:
            number = series_no[uid]
            name = folder if len(series_no) == 1 else \
                f"{folder}@{number if list(series_no.values()).count(number) == 1 else uid}"
            name += f"@{'-'.join(part)}" if len(parts[uid]) > 1 else ""      # echoes, magnitude / phase: apart
            hs = groups[(uid, part)]
            ordered, pos, notes, left = order_series(hs, name)
            alone.update(left)
            if ordered is None or len(ordered) < 2:
                why = notes[-1] if ordered is None else f"series {name} has 1 slice left"
                alone.update({p: f"{p}: not read as a volume ({why}): scored on its own"
                              for p, _ in hs if p not in alone})
                continue
            s = describe(ordered, pos, name, folder)
            s["notes"] = notes + [n for n in [gap_note(pos, name), tilt_note(hs, name)] if n]
            s["tilted"] = tilt_note(hs, name) is not None
            found.append(s)
    return found, sorted(singles + list(alone)), alone


def tilt_note(heads, name):
    """A CT acquired with the gantry tilted (GantryDetectorTilt): its slices are sheared against the patient axes,
    which a NIfTI affine of a stack of slices does not express; the note, or None."""
    tilt = numbers([heads[0][1].get("GantryDetectorTilt", 0) or 0], 1)
    if tilt and abs(tilt[0]) > 0.01:
        return (f"series {name}: gantry tilt {tilt[0]:g} deg: its slices are sheared, so its map volume is not "
                f"written (an unsheared affine would misplace it); slice and study scores are unaffected")
    return None


def series_affine(heads, pos):
    """The voxel-to-RAS affine of the volume read as (columns, rows, slices), NIfTI's convention; the median
    spacing along the normal. Identity when the files carry no geometry."""
    ds = heads[0][1]
    iop, ipp = numbers(ds.get("ImageOrientationPatient"), 6), numbers(ds.get("ImagePositionPatient"), 3)
    if iop is None or ipp is None:
        return np.eye(4).tolist()
    iop = np.asarray(iop)
    dr, dc = numbers(ds.get("PixelSpacing"), 2) or (1.0, 1.0)     # between rows, between columns
    dz = float(np.median(np.diff(pos)))
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = iop[:3] * dc, iop[3:] * dr, slice_normal(ds) * dz
    a[:3, 3] = ipp
    return (np.diag([-1, -1, 1, 1]) @ a).tolist()                   # DICOM's LPS -> NIfTI's RAS


@functools.lru_cache(maxsize=2)
def read_volume(files, window=None):
    """(Z, H, W) in [0, 1]: the modality LUT of every file, windowed as one volume. Kept for the next slice."""
    from pydicom.pixels import apply_modality_lut
    stack = []
    for p in files:
        ds, arr = scans.dicom_pixels(p)
        stack.append(apply_modality_lut(arr, ds).astype(np.float32))
        if stack[-1].shape != stack[0].shape:
            raise scans.ScanError(f"{p}: pixel data of shape {stack[-1].shape} in a series of {stack[0].shape}")
    return scans.voi_window(np.stack(stack), scans.read_dicom_header(files[0]), window)


def read_slice(files, index, window=None):
    volume = read_volume(tuple(files), None if window is None else tuple(window))
    if not 0 <= index < len(volume):
        raise scans.ScanError(f"{os.path.dirname(files[0])}: its series has {len(volume)} slice(s), not {index}")
    return volume[index]


def write_map_volume(s, slices, out):
    """Anomaly maps of slices of a series ([(index, (S, S) map)]) as one NIfTI volume on the series' grid
    (columns, rows, slices) and affine; slices not given are 0."""
    import nibabel as nib
    import torch
    rows, cols = scans.dicom_size(s["files"][0])
    volume = np.zeros((cols, rows, len(s["files"])), np.float32)
    for index, amap in slices:
        t = torch.from_numpy(amap.astype(np.float32))[None, None]
        volume[:, :, index] = torch.nn.functional.interpolate(t, size=(rows, cols), mode="bilinear")[0, 0].numpy().T
    nib.save(nib.Nifti1Image(volume, np.asarray(s["affine"])), out)
