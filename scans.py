"""
Medical scan formats, read with the field's conventions into the images the rest of the project uses: (H, W)
float32 in [0, 1]. pydicom and nibabel come with medvae; nothing else is needed.

- DICOM (`.dcm`, `.dicom`, or any file with the DICM preamble): pixel data -> modality LUT (RescaleSlope and
  RescaleIntercept, or the Modality LUT Sequence, pydicom's apply_modality_lut) -> the VOI window: --window C W
  if given, else the file's own WindowCenter/WindowWidth (the first of several; LINEAR, LINEAR_EXACT or SIGMOID
  as PS3.3 C.11.2.1.2 defines them) or its VOI LUT Sequence, else a robust 0.5-99.5 percentile window of the
  frame. MONOCHROME1 is inverted (its low values are white). A multi-frame file gives one image per frame.
- NIfTI (`.nii`, `.nii.gz`): reoriented to the closest canonical orientation (RAS+, nibabel), sliced along
  --slice-axis (axial: z, coronal: y, sagittal: x), shown in the radiological habit (anterior or superior up),
  windowed per volume (--window, or the volume's 0.5-99.5 percentiles). A 2D NIfTI is one image. A NIfTI mask
  must have its image's grid (shape and affine); label > 0 is the anomaly.
A volume's slices and a file's frames are named FILE#z=K (axis letter, 0-based index) in every output.

    import scans
    n = scans.count_images(path, axis="axial")                        # frames or slices, from the header
    img = scans.read_scan(path, index=0, axis="axial", window=None)    # (H, W) in [0, 1]
"""
import functools
import gzip
import os

import numpy as np

DICOM_EXTS = (".dcm", ".dicom")
NIFTI_EXTS = (".nii", ".nii.gz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}      # array axes of a RAS+ canonical volume
AXIS_LETTER = {0: "x", 1: "y", 2: "z"}
PERCENTILES = (0.5, 99.5)                              # the robust window when a scan brings none


class ScanError(ValueError):
    """A scan that cannot be read; the message names the file and the problem on one line."""


def is_nifti(path):
    return path.lower().endswith(NIFTI_EXTS)


def is_dicom(path):
    """By extension, or by the 'DICM' preamble at byte 128 (scanners often write files without an extension)."""
    if path.lower().endswith(DICOM_EXTS):
        return True
    if os.path.splitext(path)[1] or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


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


def read_dicom_header(path):
    import pydicom
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ScanError(f"{path}: empty file (0 bytes)")
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:
        raise ScanError(f"{path}: not a readable DICOM file ({one_line(e)})") from None


def dicom_pixels(path):
    """The dataset and its pixel array, every failure one line: compressed data without a decoder, truncation.
    The last files read are kept, so that the frames of one file are decoded once."""
    return _dicom_pixels(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=2)
def _dicom_pixels(path, mtime):
    import pydicom
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise ScanError(f"{path}: not a readable DICOM file ({one_line(e)})") from None
    if "PixelData" not in ds:
        raise ScanError(f"{path}: a DICOM file without pixel data (a report or a structured document?)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = ds.pixel_array
    except Exception as e:
        if syntax is not None and syntax.is_compressed:
            raise ScanError(f"{path}: its pixel data is compressed ({syntax.name}) and could not be decoded "
                            f"({one_line(e)}); if a decoder is missing: pip install pylibjpeg pylibjpeg-libjpeg "
                            f"pylibjpeg-openjpeg (or python-gdcm)") from None
        raise ScanError(f"{path}: unreadable DICOM pixel data, truncated or corrupt ({one_line(e)})") from None
    return ds, arr


def dicom_frames(ds, arr):
    """(frames, H, W[, 3]) whatever the file's layout."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr if frames > 1 else arr[None]


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
    """The image reoriented to the closest canonical orientation (RAS+)."""
    import nibabel as nib
    try:
        return nib.as_closest_canonical(nib.load(path))
    except Exception as e:
        raise ScanError(f"{path}: not a readable NIfTI file ({one_line(e)})") from None


def nifti_volume(img, path):
    """(X, Y, Z) float32 of a canonical image; 2D images get Z = 1. Truncated data is one line, not a traceback."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
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
    """Slice `index` along `axis` of a canonical volume, rotated so that anterior (or superior) is up. (H, W)"""
    # a view, then one copy (np.take along the last, fastest axis is a slow gather: 60 ms for a 256^2 slice)
    return np.ascontiguousarray(np.rot90(volume[(slice(None),) * axis + (index,)]))


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
    modality = str(ds.get("Modality", "")).upper()
    if modality in NOT_IMAGES:
        raise ScanError(f"{path}: a DICOM {modality} object ({NOT_IMAGES[modality]}), not an image")
    return int(ds.get("NumberOfFrames", 1) or 1), "f"


def dicom_size(path):
    """(rows, columns) from a DICOM file's header, without its pixels."""
    ds = read_dicom_header(path)
    return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)


def read_scan(path, index=0, axis="axial", window=None):
    return read_nifti(path, index, axis, window) if is_nifti(path) else read_dicom(path, index, window)


def write_map_volume(path, slices, axis, out):
    """Anomaly maps of slices of the NIfTI at `path` ([(index, (S, S) map)]) as one volume on that file's own
    grid and affine (undoing the display rotation and the canonical reorientation); slices not given are 0."""
    import nibabel as nib
    import torch
    original, canonical = nib.load(path), load_nifti(path)
    shape = canonical.shape[:3] + (1,) * (3 - len(canonical.shape))
    a = AXES[axis] if shape[2] > 1 else 2
    volume = np.zeros(shape, np.float32)
    for index, amap in slices:
        plane = [s for i, s in enumerate(shape) if i != a]                       # the slice's (rows, cols) before rot90
        t = torch.from_numpy(amap.astype(np.float32))[None, None]
        shown = torch.nn.functional.interpolate(t, size=(plane[1], plane[0]), mode="bilinear")[0, 0].numpy()
        idx = [slice(None)] * 3
        idx[a] = index
        volume[tuple(idx)] = np.rot90(shown, k=-1)                               # back from the display rotation
    back = nib.orientations.ornt_transform(nib.orientations.io_orientation(canonical.affine),
                                           nib.orientations.io_orientation(original.affine))
    volume = nib.orientations.apply_orientation(volume, back).reshape(original.shape[:3])
    nib.save(nib.Nifti1Image(volume, original.affine), out)
