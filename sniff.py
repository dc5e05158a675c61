"""
What a file is, by its content, not its name: scanners and toolkits write DICOM as `*.img`, `i22.MRDC.1`,
`MR.1.3.12...` or with no extension at all, and NIfTI or pictures under any name.

- DICOM: the 'DICM' preamble at byte 128 (DICOM PS3.10), or, without it, a dataset that pydicom parses with
  force and that carries the attributes every image object has (old ACR-NEMA-style files, some exports).
- NIfTI-1 / Analyze 7.5 / NIfTI-2: the header's sizeof_hdr (348 or 540, either byte order) with NIfTI's magic
  ('n+1', 'ni1', 'n+2'), gzipped or not; MGH/MGZ: FreeSurfer's version-1 header, gzipped (.mgz) or not.
- Pictures: PNG, JPEG, BMP, TIFF, GIF and WebP by their magic bytes.

    import sniff
    sniff.kind("/data/export/i22.MRDC.1")    # "dicom", "nifti", "mgh", "image" or None (not a format read here)
"""
import functools
import gzip
import os
import struct

IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))
NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00")
DICOM_KEYS = ("SOPClassUID", "Modality", "Rows", "PatientID", "StudyInstanceUID")


def head(path, n=600):
    """The first n bytes of a file, gunzipped where it is gzip (a .nii.gz or .mgz under any name)."""
    with open(path, "rb") as f:
        raw = f.read(n)
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read(n), True
        except (OSError, EOFError):
            return b"", True
    return raw, False


def nifti_header(raw):
    """'nifti' for a NIfTI-1, NIfTI-2 or Analyze 7.5 header, else None."""
    for order in "<>":
        if len(raw) >= 348 and struct.unpack(order + "i", raw[:4])[0] == 348:
            return "nifti" if raw[344:348] in NIFTI_MAGIC or raw[344:348] == b"\x00" * 4 else None
        if len(raw) >= 540 and struct.unpack(order + "i", raw[:4])[0] == 540 and raw[4:8] == b"n+2\x00":
            return "nifti"
    return None


def mgh_header(raw):
    """FreeSurfer MGH: big-endian version 1, then width, height, depth, frames (positive) and a known type."""
    if len(raw) < 28:
        return None
    version, w, h, d, frames, dtype = struct.unpack(">6i", raw[:24])
    return "mgh" if version == 1 and min(w, h, d, frames) > 0 and dtype in (0, 1, 3, 4) else None


def parses_as_dicom(path):
    """A file without the preamble that pydicom reads with force as an image object's dataset."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return False
    return any(k in ds for k in DICOM_KEYS)


@functools.lru_cache(maxsize=65536)
def _kind(path, size, mtime):
    if size == 0:
        return None
    raw, zipped = head(path)
    if not zipped and raw[128:132] == b"DICM":
        return "dicom"
    found = nifti_header(raw) or mgh_header(raw)
    if found:
        return found
    if zipped:
        return None
    if any(raw.startswith(m) for m, _ in IMAGE_MAGIC) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"):
        return "image"
    return "dicom" if parses_as_dicom(path) else None


def kind(path):
    """"dicom", "nifti", "mgh", "image", or None for a file that is none of them (or empty, or unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _kind(os.fspath(path), st.st_size, st.st_mtime_ns)
