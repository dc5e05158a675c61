"""
A folder of the user's own files, every file accounted for: each is scored (as an image, a frame, a slice of a
NIfTI volume or of a DICOM series, all through its study) or skipped with one line that says why in a user's
words, and the run adds them up (files seen = scored + skipped). evaluate.py --images reads folders this way.

    import folders
    records, skipped = folders.own_images("my_scans/", scan=None)   # readable records, [(path, reason)]

A labelled split (data.load_split) is stricter: it fails on its first bad file, since its labels would be wrong.
"""
import os

import data
import scans
import series


def list_images(folder, scan=None):
    """Records of the image and scan files under folder (recursive): a record per image, per frame of a DICOM
    file or slice of a NIfTI volume, per slice of a DICOM series (its files in any subfolders, series.py), and
    (path, reason) of every other file in it: formats not read here are said, not dropped silently, and so are
    files whose header cannot be read, hidden files. The files of a series that cannot be one volume are records
    of their own, each with a "note" that says why."""
    folder = os.fspath(folder)
    files, other = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if fn.startswith("."):
                other.append((path, f"{path}: a hidden file (its name starts with '.'), passed over"))
                continue
            if not fn.lower().endswith(data.IMAGE_EXTS) and not scans.is_scan(path):
                ext = os.path.splitext(fn)[1] or "(no extension)"
                other.append((path, f"{path}: {ext} is not a format read here ({', '.join(data.IMAGE_EXTS)}, "
                                    f"DICOM, NIfTI)"))
                continue
            files.append(path)
    found, singles, alone = series.find_series([p for p in files if scans.is_dicom(p)], folder)
    recs = []
    for s in found:
        try:
            recs.extend(data.series_records(s, -1, "unknown", scan))
        except data.DataError as e:           # a slice that cannot be decoded: no volume; its files one by one
            alone.update({p: f"{p}: not read as a volume (series {s['name']}: {e}): scored on its own"
                          for p in s["files"]})
            singles = singles + list(s["files"])
            continue
        for line in s["notes"]:
            print(f"note: {line}")
    for path in [p for p in files if not scans.is_dicom(p)] + sorted(singles):
        try:
            name = os.path.relpath(path, folder).replace(os.sep, "/")
            new = data.scan_records(path, name, -1, "unknown", scan=scan)
        except data.DataError as e:
            other.append((path, str(e)))
            continue
        if path not in alone and scans.is_dicom(path) and scans.read_dicom_header(path).forced:
            alone[path] = f"{path}: {scans.NO_HEADER}"      # an image all the same: scored, and said
        recs.extend(dict(r, note=alone[path]) if path in alone else r for r in new)
    if not recs:
        formats = f"; {len(other)} file(s) of other formats, e.g. {other[0][0]}" if other else ""
        raise data.DataError(f"{folder}: no images here (missing or empty folder; looked for "
                             f"{', '.join(data.IMAGE_EXTS)}, DICOM and NIfTI){formats}")
    return data.in_order(recs), other


def own_images(folder, scan=None):
    """The images under `folder` that can be read, and every file left out with its one-line reason. An own
    folder is scored as far as it can be; a labelled split instead fails on its first bad file."""
    records, skipped = list_images(folder, scan)                 # skipped: files of formats not read here
    readable, failed = [], {}
    for r in records:                      # decoded once ahead: a small cost next to the CLIP forward of each
        try:
            data.read_image(r)
            readable.append(r)
        except data.DataError as e:
            failed.setdefault(r["path"], []).append(str(e))
    scored = {p for r in readable for p in data.study_files(r)}
    skipped += [(p, why[0]) for p, why in failed.items() if p not in scored]   # one line per file, not per slice
    notes = {r["path"]: r["note"] for r in readable if r.get("note")}
    notes.update({p: f"{why[0]} ({len(why)} of its images could not be read; the others are scored)"
                  for p, why in failed.items() if p in scored})
    for line in [f"skipped {why}" for _, why in skipped] + [f"note: {n}" for n in notes.values()]:
        print(line)
    seen = sum(len(fs) for _, _, fs in os.walk(folder))
    print(f"files seen {seen} = scored {len(scored)} + skipped {len(skipped)}"
          + ("" if seen == len(scored) + len(skipped) else " DOES NOT ADD UP: please report it"))
    if not readable:
        raise data.DataError(f"{folder}: none of its {len(records)} image file(s) could be read"
                             + (f" ({len(skipped)} skipped, reasons above)" if skipped else ""))
    return readable, skipped
