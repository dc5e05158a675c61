"""
A folder of the user's own files, every file accounted for, by construction: each file found under the folder gets
exactly one entry in one ledger, written in one place: scored (and under which study) or skipped (and why, in a
user's words). The tally `files seen N = scored A + skipped B` is computed from the ledger, so it adds up; a file
that no step decided on (a bug) is skipped with a reason that says so and names it.

Every step that reads or groups files runs behind one fault boundary (attempt): an exception of any kind there,
from pydicom, nibabel, numpy, PIL or SimpleITK alike, skips the files that step was about with what failed (the
exception's type and first line) and the run goes on. Kinds are sniffed from content (sniff.py), not names.

    import folders
    records, skipped = folders.own_images("my_scans/", scan=None)   # readable records, [(path, reason)]

A labelled split (data.load_split) is stricter: it fails on its first bad file, since its labels would be wrong.
"""
import os
import re

import numpy as np

import data
import scans
import series
import sniff

MASK_NAME = re.compile(r"^(?P<stem>.+?)[_\-. ](mask|seg|segmentation|label|labels|labelmap|roi)$", re.I)
LABEL_VALUES = 16          # an integer volume with at most this many distinct values is a label map, not an image


class Ledger:
    """Every file under a folder, one entry each: ("scored", study) or ("skipped", reason). The first decision
    about a file stands; scoring a file that was skipped is a bug and raises."""

    def __init__(self, files):
        self.files, self.entry = list(files), {}

    def skip(self, path, reason):
        self.entry.setdefault(path, ("skipped", reason))

    def score(self, path, study):
        if self.entry.get(path, ("scored",))[0] != "scored":
            raise AssertionError(f"{path}: scored after it was skipped ({self.entry[path][1]})")
        self.entry[path] = ("scored", study)

    def skipped(self):
        return [(p, self.entry[p][1]) for p in self.files if self.entry[p][0] == "skipped"]

    def close(self):
        """Every file decided on (a file left undecided is a bug, skipped and named); the tally line."""
        for p in self.files:
            self.skip(p, f"{p}: not accounted for by any step (a bug of this program: please report it)")
        scored = sum(e[0] == "scored" for e in self.entry.values())
        return f"files seen {len(self.files)} = scored {scored} + skipped {len(self.files) - scored}"


def one_line(e):
    """An exception as a user reads it: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {' '.join(first.split())[:200]}" if first else type(e).__name__


def attempt(what, fn, *args):
    """The fault boundary: (fn(*args), None), or (None, why) for an exception of any kind, in a user's words: our
    own one-line reasons as they are, anything else as what failed, with the exception's type and first line."""
    try:
        return fn(*args), None
    except data.DataError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{what} failed ({one_line(e)})"


def about(path, why):
    """A reason as a row of path's: prefixed with the path unless it starts with it."""
    return why if why.startswith(path) else f"{path}: {why}"


def walk(folder):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise data.DataError(f"{folder}: no images here (missing or empty folder; looked for "
                             f"{', '.join(data.IMAGE_EXTS)}, DICOM and NIfTI)")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return files


def mask_of(path, kinds):
    """The image a file is the mask of, by name (`X_mask.png`, `X_seg.nii.gz`, `X-label.tif` beside `X.*` of an
    image kind), or None."""
    base, name = os.path.split(path)
    stem = name[:-7] if name.lower().endswith(".nii.gz") else os.path.splitext(name)[0]
    m = MASK_NAME.match(stem)
    if not m:
        return None
    return next((p for p, k in kinds.items() if k and p != path and os.path.dirname(p) == base and
                 os.path.basename(p).split(".")[0] == m["stem"]), None)


def label_map(path):
    """A NIfTI of integers with few distinct values is a label map (a segmentation), not an image; its reason."""
    img = scans.load_nifti(path)
    slope = getattr(img.header, "get_slope_inter", lambda: (None, None))()[0]
    if not np.issubdtype(img.get_data_dtype(), np.integer) or slope not in (None, 1):
        return None
    values = np.unique(np.asarray(img.dataobj))
    if len(values) <= LABEL_VALUES:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        return f"{path}: a label map (integers, {len(values)} values: {shown}), not an image of a patient"
    return None


def unknown(path):
    """Why a file of no kind read here is skipped: empty, not a regular file, or of another format."""
    if not os.path.isfile(path):
        return f"{path}: unreadable: a broken link, or not a regular file"
    if os.path.getsize(path) == 0:
        return f"{path}: empty file (0 bytes)"
    ext = os.path.splitext(path)[1] or "(no extension)"
    return f"{path}: {ext} is not a format read here (by its content: not DICOM, NIfTI, MGH or a picture)"


def sort_files(files, ledger):
    """{path: kind} by content; hidden files, files of no kind read here, masks beside their image and label maps
    are skipped with their reason. An Analyze/NIfTI pair's .img goes with its .hdr (kind "pair")."""
    kinds = {}
    for p in files:
        if os.path.basename(p).startswith("."):
            ledger.skip(p, f"{p}: a hidden file (its name starts with '.'), passed over")
            continue
        kinds[p], why = attempt("reading its first bytes", sniff.kind, p)
        if why:
            ledger.skip(p, about(p, why))
    for p, k in kinds.items():
        if k == "nifti" and p.lower().endswith(".hdr") and kinds.get(p[:-4] + ".img", "") is None:
            kinds[p[:-4] + ".img"] = "pair"
    for p, k in kinds.items():
        if p in ledger.entry:
            continue
        image, why = attempt("matching it to an image by name", mask_of, p, kinds) if k else (None, None)
        if k is None:
            ledger.skip(p, unknown(p))
        elif why or (k != "pair" and image):
            ledger.skip(p, about(p, why) if why else f"{p}: the mask of {os.path.basename(image)} (by its name), "
                                                     f"not an image of a patient")
        elif k in ("nifti", "mgh"):
            label, why = attempt("reading its header", label_map, p)
            if label or why:
                ledger.skip(p, about(p, label or why))
    return {p: k for p, k in kinds.items() if k and p not in ledger.entry}


def study_records(kinds, folder, scan, ledger):
    """(study name, its files, its records) for every study: DICOM series (grouped behind the boundary: if the
    grouping fails, each file is its own study), then every other file on its own."""
    dicoms = [p for p, k in kinds.items() if k == "dicom"]
    found, why = attempt("grouping the DICOM files into series", series.find_series, dicoms, folder)
    found, singles, alone = found or ([], dicoms, {p: about(p, f"{why}: scored on its own") for p in dicoms} if why
                                      else {})
    for s in found:
        recs, why = attempt(f"reading series {s['name']}", data.series_records, s, -1, "unknown", scan)
        if why:                                       # no volume: its files one by one, each said
            alone.update({p: f"{p}: not read as a volume (series {s['name']}: {why}): scored on its own"
                          for p in s["files"]})
            singles = singles + list(s["files"])
            continue
        for line in s["notes"]:
            print(f"note: {line}")
        yield s["name"], list(s["files"]), recs
    for p in [p for p in kinds if kinds[p] not in ("dicom", "pair")] + sorted(singles):
        name = os.path.relpath(p, folder).replace(os.sep, "/")
        files = [p] + [q for q in [p[:-4] + ".img"] if kinds.get(q) == "pair"]
        recs, why = attempt("reading it", lambda: data.scan_records(p, name, -1, "unknown", scan=scan))
        if why:
            for q in files:
                ledger.skip(q, about(q, why))
            continue
        forced, _ = attempt("reading its header", lambda: kinds[p] == "dicom" and scans.read_dicom_header(p).forced)
        note = alone.get(p) or (f"{p}: {scans.NO_HEADER}" if forced else None)
        yield name, files, [dict(r, note=note) if note else r for r in recs]


def read_study(recs):
    """The records of a study whose image decodes and is not constant, and {file: (its first reason, how many of
    its images failed)} of the others."""
    readable, failed = [], {}
    for r in recs:
        try:
            img = data.read_image(r)
            if float(img.max()) - float(img.min()) < 1e-6:
                raise data.DataError(f"{r['path']}: empty: a constant image (every pixel {float(img.flat[0]):.3g})")
            readable.append(r)
        except Exception as e:
            why = str(e) if isinstance(e, data.DataError) else f"{r['path']}: decoding failed ({one_line(e)})"
            first, n = failed.get(r["path"], (why, 0))
            failed[r["path"]] = (first, n + 1)
    return readable, failed


def own_images(folder, scan=None):
    """The images under `folder` that can be read, and every file left out with its one-line reason. An own
    folder is scored as far as it can be; a labelled split instead fails on its first bad file."""
    ledger = Ledger(walk(folder))
    kinds = sort_files(ledger.files, ledger)
    readable, notes = [], []
    for name, files, recs in study_records(kinds, os.fspath(folder), scan, ledger):
        result, why = attempt(f"decoding {name}", read_study, recs)
        good, failed = result or ([], {})
        if why or not good:
            for p in files:
                ledger.skip(p, about(p, why or failed.get(p, (f"none of the images of {name} could be read",))[0]))
            continue
        for p in files:
            ledger.score(p, name)
        readable += good
        notes += [r["note"] for r in good if r.get("note")]
        notes += [f"{about(p, first)} ({n} of the images of {name}; the others are scored)"
                  for p, (first, n) in failed.items()]
    tally = ledger.close()
    skipped = ledger.skipped()
    for line in [f"skipped {why}" for _, why in skipped] + [f"note: {n}" for n in dict.fromkeys(notes)]:
        print(line)
    print(tally)
    if not readable:
        raise data.DataError(f"{folder}: no images here that could be read ({tally}; reasons above; looked for "
                             f"{', '.join(data.IMAGE_EXTS)}, DICOM and NIfTI by content)")
    return data.in_order(readable), skipped


def list_images(folder, scan=None):
    """own_images without its printing: the readable records and the skipped files (for tests and tools)."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return own_images(folder, scan)
