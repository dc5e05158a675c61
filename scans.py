"""
Medical scan formats, read with the field's conventions into the images the rest of the project uses: (H, W)
float32 in [0, 1]. pydicom and nibabel come with medvae; nothing else is needed.

- DICOM (by content, whatever the name: the DICM preamble, or a dataset pydicom parses; sniff.py): pixel data -> modality LUT (RescaleSlope and
  RescaleIntercept, or the Modality LUT Sequence, pydicom's apply_modality_lut) -> the VOI window: --window C W
  if given, else the file's own WindowCenter/WindowWidth (the first of several; LINEAR, LINEAR_EXACT or SIGMOID
  as PS3.3 C.11.2.1.2 defines them) or its VOI LUT Sequence, else a robust 0.5-99.5 percentile window of the
  frame. MONOCHROME1 is inverted (its low values are white). A multi-frame file gives one image per frame.
- NIfTI-1/2, Analyze and MGH (by their header, whatever the name; RGB(A) voxels as luminance): reoriented to the closest canonical orientation (RAS+, nibabel), sliced along
  --slice-axis (axial: z, coronal: y, sagittal: x), shown in the radiological habit (anterior or superior up),
  windowed per volume (--window, or the volume's 0.5-99.5 percentiles). A 2D NIfTI is one image. A NIfTI mask
  must have its image's grid (shape and affine); label > 0 is the anomaly.
A volume's slices and a file's frames are named FILE#z=K (axis letter, 0-based index) in every output.

    import scans
    n = scans.count_images(path, axis="axial")                        # frames or slices, from the header
    img = scans.read_scan(path, index=0, axis="axial", window=None)    # (H, W) in [0, 1]
"""
import contextlib
import functools
import gzip
import logging
import os
import re
import sys
import tempfile
import warnings

import numpy as np

import sniff

# pydicom's warnings about malformed values name no file: each problem is said once, with the file, where it matters
warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
logging.getLogger("pydicom").addHandler(logging.NullHandler())      # its decoders log tracebacks on failure
logging.getLogger("pydicom").propagate = False
DICOM_EXTS = (".dcm", ".dicom")
NIFTI_EXTS = (".nii", ".nii.gz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}      # array axes of a RAS+ canonical volume
AXIS_LETTER = {0: "x", 1: "y", 2: "z"}
PERCENTILES = (0.5, 99.5)                              # the robust window when a scan brings none


class ScanError(ValueError):
    """A scan that cannot be read; the message names the file and the problem on one line."""


def is_nifti(path):
    """A NIfTI (or Analyze, or MGH) volume: by its header, whatever its name (sniff.py); a .nii/.nii.gz name that
    is not readable still counts, so that its reader says what is wrong with it."""
    return sniff.kind(path) in ("nifti", "mgh") or (path.lower().endswith(NIFTI_EXTS) and sniff.kind(path) is None)


def is_dicom(path):
    """By content (the 'DICM' preamble, or a dataset pydicom parses: sniff.py), whatever the name; a .dcm name that
    is not readable still counts, so that its reader says what is wrong with it."""
    return sniff.kind(path) == "dicom" or (path.lower().endswith(DICOM_EXTS) and sniff.kind(path) is None)


def is_scan(path):
    return is_dicom(path) or is_nifti(path)


def one_line(e):
    return " ".join(str(e).split())[:200] or type(e).__name__


# -----------------------------------------------------------------------------
# windows

def window_linear(x, center, width, function="LINEAR"):
    """A DICOM VOI window onto [0, 1] (PS3.3 C.11.2.1.2.1 and C.11.2.1.3: LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR":                               # the standard's half-pixel convention
        center, width = center - 0.5, width - 1
    return np.clip((x - center) / max(width, 1e-6) + 0.5, 0, 1)


def window_percentiles(x):
    lo, hi = np.percentile(x, PERCENTILES)
    return np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)


# -----------------------------------------------------------------------------
# DICOM

NOT_IMAGES = {"SEG": "a segmentation", "RTSTRUCT": "radiotherapy structures", "RTDOSE": "a radiotherapy dose grid",
              "RTPLAN": "a radiotherapy plan", "RTRECORD": "a radiotherapy record", "SR": "a structured report",
              "KO": "a key-object selection", "PR": "a presentation state", "REG": "a registration", "DOC": "a document"}


DICOMDIR_UID = "1.2.840.10008.1.3.10"         # Media Storage Directory Storage: a DICOMDIR
NO_HEADER = "the file lacks a DICOM header (no 'DICM' preamble or file meta) and was read anyway"


@contextlib.contextmanager
def quiet(path):
    """Decoder and reader noise, attributed to its file: Python warnings are silenced, and what C decoders
    (openjpeg, gdcm) write to the process's stderr is captured; a ScanError raised inside gets it appended."""
    with tempfile.TemporaryFile() as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield
        except ScanError as e:
            os.dup2(saved, 2)
            f.seek(0)
            said = " ".join(f.read().decode(errors="replace").split())[:200]
            raise ScanError(f"{e} (the decoder said: {said})" if said else str(e)) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def dcmread(path, **kw):
    """pydicom.dcmread, and with force when the file lacks the DICOM preamble and file meta (old files, some
    exports): then ds.forced is True and, where pydicom can tell, a transfer syntax is filled in to decode with.
    A forced read that finds no DICOM dataset in the file is a ScanError."""
    import pydicom
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ScanError(f"{path}: empty file (0 bytes)")
    try:
        try:
            ds, forced = pydicom.dcmread(path, **kw), False
        except pydicom.errors.InvalidDicomError:
            ds, forced = pydicom.dcmread(path, force=True, **kw), True
    except Exception as e:
        raise ScanError(f"{path}: not a readable DICOM file ({one_line(e)})") from None
    if forced:
        if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "PatientID", "StudyInstanceUID")):
            raise ScanError(f"{path}: not a DICOM file: it has no DICOM header (no 'DICM' preamble or file meta), "
                            f"and read anyway its content is no DICOM dataset")
        if "TransferSyntaxUID" not in ds.file_meta and getattr(ds, "original_encoding", None):
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else (
                pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    ds.forced = forced
    return ds


def header_int(ds, key, default=None):
    """An integer header value, or default when absent or empty; None when present but not a number (badly
    written files carry IS values like '1A')."""
    value = ds.get(key, None)
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(float(str(value)))
    except ValueError:
        return None


def not_an_image(ds):
    """Why a DICOM dataset (header) is not an image to score, in a user's words; None when it is one."""
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", "") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop == DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        why = "a DICOMDIR (a media directory: it lists the DICOM files of a disc or export, and holds no image)"
    elif "WaveformSequence" in ds:
        why = f"a DICOM waveform ({'an ECG' if modality == 'ECG' else modality or 'signals'}), not an image"
    elif modality in NOT_IMAGES:
        why = f"a DICOM {modality} object ({NOT_IMAGES[modality]}), not an image"
    elif not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        why = "a DICOM file without pixel data (a header only)"
    elif header_int(ds, "Rows", 0) in (None, 0) or header_int(ds, "Columns", 0) in (None, 0):
        why = f"its image size is missing or malformed (Rows '{ds.get('Rows', '')}', Columns '{ds.get('Columns', '')}')"
    elif header_int(ds, "NumberOfFrames", 1) in (None, 0):
        why = f"its NumberOfFrames is '{ds.get('NumberOfFrames')}', not a number of frames"
    else:
        return None
    return why + (f"; {NO_HEADER}" if getattr(ds, "forced", False) else "")


def read_dicom_header(path):
    """The header, and whether pixel data is there (its value is not read)."""
    with quiet(path):
        return dcmread(path, defer_size=1024)


def dicom_pixels(path):
    """The dataset and its pixel array, every failure one line: compressed data without a decoder, truncation.
    The last files read are kept, so that the frames of one file are decoded once."""
    return _dicom_pixels(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=2)
def _dicom_pixels(path, mtime):
    with quiet(path):
        ds = dcmread(path)
        why = not_an_image(ds)
        if why:
            raise ScanError(f"{path}: {why}")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        try:
            arr = ds.pixel_array
        except Exception as e:
            short = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", str(e))
            if short:
                raise ScanError(f"{path}: truncated: its pixel data holds {short[1]} of the {short[2]} bytes its "
                                f"header describes") from None
            if syntax is not None and syntax.is_compressed and "missing dependencies" in str(e):
                raise ScanError(f"{path}: its pixel data is compressed ({syntax.name}) and no decoder for it is "
                                f"installed: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or "
                                f"python-gdcm)") from None
            if syntax is not None and syntax.is_compressed:   # the decoders' own words come from quiet()
                raise ScanError(f"{path}: its pixel data is compressed ({syntax.name}) and the installed decoders "
                                f"could not decode it: corrupt, or a variant they do not support") from None
            raise ScanError(f"{path}: unreadable DICOM pixel data, truncated or corrupt ({one_line(e)})") from None
    return ds, arr


def dicom_frames(ds, arr):
    """(frames, H, W[, 3]) whatever the file's layout."""
    return arr if header_int(ds, "NumberOfFrames", 1) > 1 else arr[None]


def read_dicom(path, index=0, window=None):
    """Frame `index` of a DICOM file, (H, W) in [0, 1] (colour files: the mean of their channels)."""
    from pydicom.pixels import apply_modality_lut
    ds, arr = dicom_pixels(path)
    frames = dicom_frames(ds, arr)
    if not 0 <= index < len(frames):
        raise ScanError(f"{path}: has {len(frames)} frame(s), not a frame {index}")
    frame = frames[index]
    if int(ds.get("SamplesPerPixel", 1)) > 1:          # colour (pydicom converts YBR to RGB): scale by bit depth
        return (frame.astype(np.float32) / (2 ** int(ds.BitsStored) - 1)).mean(-1)
    return voi_window(apply_modality_lut(frame, ds).astype(np.float64), ds, window)


def voi_window(x, ds, window=None):
    """Rescaled values onto [0, 1]: --window C W, else the file's own window (the first of several) or VOI LUT,
    else x's 0.5-99.5 percentiles; MONOCHROME1 inverted. x: a frame, or a whole series (series.py)."""
    from pydicom.pixels import apply_voi_lut
    if window is not None:
        y = window_linear(x, window[0], window[1], "LINEAR_EXACT")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        first = lambda key: float(ds[key].value[0] if ds[key].VM > 1 else ds[key].value)   # the first of several
        y = window_linear(x, first("WindowCenter"), first("WindowWidth"), str(ds.get("VOILUTFunction", "LINEAR")).upper())
    elif "VOILUTSequence" in ds:                       # a lookup table: its output range is its bit depth's
        y = apply_voi_lut(x, ds, index=0) / (2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        y = window_percentiles(x)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        y = 1 - y                                      # MONOCHROME1: the lowest value is displayed white
    return np.clip(y, 0, 1).astype(np.float32)


# -----------------------------------------------------------------------------
# NIfTI

def load_nifti(path):
    """The image reoriented to the closest canonical orientation (RAS+). NIfTI-1 and NIfTI-2 volumes; a CIFTI-2
    file (.dtseries.nii and kin) is said to be one."""
    import nibabel as nib
    try:
        img = load_raw(path)
    except Exception as e:
        raise ScanError(f"{path}: not a readable NIfTI file ({one_line(e)})") from None
    if isinstance(img, nib.Cifti2Image):
        raise ScanError(f"{path}: a CIFTI-2 file (data on brain surfaces and grayordinates), not a voxel volume")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.AnalyzeImage, nib.MGHImage)):
        raise ScanError(f"{path}: a {type(img).__name__.replace('Image', '')} file, not a NIfTI volume")
    try:
        return nib.as_closest_canonical(img)
    except Exception as e:
        kind = "NIfTI-2" if isinstance(img, nib.Nifti2Image) else "NIfTI"
        raise ScanError(f"{path}: a {kind} file whose orientation cannot be read ({one_line(e)})") from None


def load_raw(path):
    """nibabel's image of a file, as stored: by its name where nibabel knows it, else from its bytes."""
    import nibabel as nib
    return nib.load(path) if path.lower().endswith((".nii", ".nii.gz", ".hdr", ".mgh", ".mgz")) else from_bytes(path)


def from_bytes(path):
    """A NIfTI-1/2 or MGH file under a name nibabel does not recognise (sniff.py found its header)."""
    import nibabel as nib
    raw = open(path, "rb").read()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    for cls in (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage):
        try:
            return cls.from_bytes(raw)
        except Exception:
            continue
    raise ScanError(f"{path}: a volume header, but no NIfTI-1, NIfTI-2 or MGH image nibabel can read")


def as_grey(data, path):
    """Structured voxels (RGB / RGBA NIfTI: fields R, G, B[, A]) as ITU-R BT.601 luminance; other structures are
    one line."""
    names = data.dtype.names or ()
    if {"R", "G", "B"} <= set(names):
        return 0.299 * data["R"].astype(np.float32) + 0.587 * data["G"] + 0.114 * data["B"]
    raise ScanError(f"{path}: voxels of a structured type {data.dtype.descr}, not intensities (read as colour "
                    f"only with R, G, B fields)")


def nifti_volume(img, path):
    """(X, Y, Z) float32 of a canonical image; 2D images get Z = 1; RGB(A) voxels as grey. Truncated data is one
    line, not a traceback."""
    try:
        raw = np.asarray(img.dataobj)
        data = as_grey(raw, path) if raw.dtype.names else raw.astype(np.float32)
    except (EOFError, OSError, ValueError, gzip.BadGzipFile) as e:
        raise ScanError(f"{path}: NIfTI data shorter than its header says, truncated or corrupt "
                        f"({one_line(e)})") from None
    if any(n > 1 for n in data.shape[3:]):
        raise ScanError(f"{path}: a {data.ndim}D NIfTI of shape {data.shape}; give one 3D volume")
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 else data
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ScanError(f"{path}: a {img.ndim}D NIfTI with more than one volume; give one 3D volume")
    return np.nan_to_num(data)


def nifti_slice(volume, index, axis):
    """Slice `index` along `axis` of a canonical (RAS+) volume as clinical viewers and DICOM series show it
    (radiological): anterior or superior up, the patient's right on the image's left (sagittal: anterior left).
    (H, W)"""
    # a view, then one copy (np.take along the last, fastest axis is a slow gather: 60 ms for a 256^2 slice)
    return np.ascontiguousarray(np.fliplr(np.rot90(volume[(slice(None),) * axis + (index,)])))


@functools.lru_cache(maxsize=2)
def windowed_volume(path, mtime, window):
    """The canonical volume on [0, 1], windowed as a whole: every slice of it on one scale. Kept for the next
    slice: a volume is read and windowed once, not once per slice."""
    volume = nifti_volume(load_nifti(path), path)
    y = window_linear(volume, window[0], window[1], "LINEAR_EXACT") if window is not None else \
        window_percentiles(volume)
    return y.astype(np.float32)


def read_nifti(path, index=0, axis="axial", window=None):
    volume = windowed_volume(path, os.path.getmtime(path), None if window is None else tuple(window))
    a = AXES[axis] if volume.shape[2] > 1 else 2       # a 2D NIfTI is its one slice
    if not 0 <= index < volume.shape[a]:
        raise ScanError(f"{path}: has {volume.shape[a]} {axis} slice(s), not a slice {index}")
    return nifti_slice(volume, index, a)


def read_nifti_mask(path, index, axis, image_path):
    """Slice `index` of a NIfTI mask (label > 0) on the grid of the NIfTI image at image_path, checked."""
    volume = mask_volume(path, os.path.getmtime(path), image_path)
    a = AXES[axis] if volume.shape[2] > 1 else 2
    return nifti_slice(volume, index, a)


@functools.lru_cache(maxsize=2)
def mask_volume(path, mtime, image_path):
    mask, image = load_nifti(path), load_nifti(image_path)
    if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise ScanError(f"{path}: mask grid {mask.shape[:3]} does not match its image {image_path} "
                        f"{image.shape[:3]} (shape and affine must be the same)")
    return nifti_volume(mask, path) > 0


# -----------------------------------------------------------------------------
# what a file holds

def count_images(path, axis="axial"):
    """How many images a scan file holds (frames, or slices along axis), and the letter that names them."""
    if is_nifti(path):
        img = load_nifti(path)
        if any(n > 1 for n in img.shape[3:]):
            raise ScanError(f"{path}: a {len(img.shape)}D NIfTI of shape {img.shape} ({int(np.prod(img.shape[3:]))} "
                            f"volumes); give one 3D volume")
        shape = img.shape[:3] + (1,) * (3 - len(img.shape[:3]))
        a = AXES[axis] if shape[2] > 1 else 2
        return int(shape[a]), AXIS_LETTER[a]
    ds = read_dicom_header(path)
    why = not_an_image(ds)
    if why:
        raise ScanError(f"{path}: {why}")
    return header_int(ds, "NumberOfFrames", 1), "f"


def dicom_size(path):
    """(rows, columns) from a DICOM file's header, without its pixels."""
    ds = read_dicom_header(path)
    return header_int(ds, "Rows", 0) or 0, header_int(ds, "Columns", 0) or 0


def read_scan(path, index=0, axis="axial", window=None):
    return read_nifti(path, index, axis, window) if is_nifti(path) else read_dicom(path, index, window)
