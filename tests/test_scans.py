"""DICOM and NIfTI, on files the tests write: pixel values against pydicom's and nibabel's own reference
functions, multi-frame files and volumes as one image per frame or slice, masks, and bad files in one line."""
# atol 1e-6 below: float32 rounding (eps 1.2e-7) of a few element-wise operations on values in [0, 1], no sums
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

import data
import exports
import folders
import scans


def write_dicom(path, arr, syntax=ExplicitVRLittleEndian, preamble=True, **tags):
    """A minimal CT image (12 bits stored, unsigned) holding arr (H, W) or (frames, H, W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if arr.ndim == 3:
        ds.NumberOfFrames = len(arr)
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].is_undefined_length, ds["PixelData"].VR = True, "OB"
    else:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


RAMP = np.arange(64 * 64).reshape(64, 64) % 4096


def test_dicom_rescale_then_the_files_first_window(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=[40, 300], WindowWidth=[400, 1500])
    ours = scans.read_dicom(path)
    ds = pydicom.dcmread(path)
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds, index=0)     # onto [y_min, y_max]
    y_min, y_max = -1024, 4095 * 2 - 1024                                          # 12 bits, rescaled
    np.testing.assert_allclose(ours, (ref - y_min) / (y_max - y_min), atol=1e-6)
    assert ours.min() == 0 and ours.max() == 1 and 0 < (ours == 0).mean() < 1
    # --window C W overrides the file's, on the rescaled (Hounsfield) values
    hu = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(scans.read_dicom(path, window=(500, 1000)), np.clip((hu - 0) / 1000, 0, 1), atol=1e-6)


def test_monochrome1_is_inverted_and_no_window_means_percentiles(tmp_path):
    mono2 = scans.read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP))
    mono1 = scans.read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1"))
    lo, hi = np.percentile(RAMP.astype(float), (0.5, 99.5))
    np.testing.assert_allclose(mono2, np.clip((RAMP - lo) / (hi - lo), 0, 1), atol=1e-6)
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)


def test_multi_frame_and_extensionless_dicom_give_an_image_per_frame(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    frames = np.stack([RAMP, 4095 - RAMP, RAMP // 2])
    write_dicom(folder / "IM0001", frames, WindowCenter=2048, WindowWidth=4096)     # no extension: DICM preamble
    recs, other = folders.list_images(folder)
    assert [r["name"] for r in recs] == ["IM0001#f=0", "IM0001#f=1", "IM0001#f=2"] and not other
    ds = pydicom.dcmread(folder / "IM0001")
    for r, frame in zip(recs, ds.pixel_array):
        ref = (apply_windowing(frame.astype(float), ds) - 0) / 4095
        np.testing.assert_allclose(data.read_image(r)[..., 0], ref, atol=1e-6)


def test_bad_dicoms_say_what_in_one_line(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", RAMP)
    blob = open(path, "rb").read()
    (tmp_path / "t.dcm").write_bytes(blob[:len(blob) - 3000])
    with pytest.raises(scans.ScanError, match="t.dcm: truncated: its pixel data holds 5192 of the 8192 bytes"):
        scans.read_dicom(path)
    jp2 = write_dicom(tmp_path / "j.dcm", RAMP, syntax=JPEG2000Lossless)
    with pytest.raises(scans.ScanError) as e:
        scans.read_dicom(jp2)
    assert "j.dcm: its pixel data is compressed (JPEG 2000 Image Compression (Lossless Only))" in str(e.value)
    assert "the installed decoders could not decode it" in str(e.value) and "\n" not in str(e.value)


def write_volume(path, volume, affine):
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return str(path)


# an oblique, flipped, permuted grid: voxel axes (i, j, k) point along (-y, +z, -x) in world space
AFFINE = np.array([[0, 0, -2.0, 40], [-1.5, 0, 0, 30], [0, 3.0, 0, -20], [0, 0, 0, 1]])


def radiological(a):
    """A canonical (RAS+) slice as scans.nifti_slice shows it: anterior up, the patient's right on the left."""
    return np.fliplr(np.rot90(a))


def test_nifti_volume_reoriented_sliced_windowed_as_nibabel_says(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 30, (40, 36, 34)).astype(np.float32)
    path = write_volume(tmp_path / "t1.nii.gz", volume, AFFINE)
    canonical = nib.as_closest_canonical(nib.load(path))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    ref = np.asarray(canonical.dataobj, dtype=np.float32)
    recs, _ = folders.list_images(tmp_path, scan=dict(axis="axial", window=(100, 60)))
    assert len(recs) == ref.shape[2] and recs[5]["name"] == "t1.nii.gz#z=5"
    expect = radiological(np.clip((ref[:, :, 5] - 70) / 60, 0, 1))
    np.testing.assert_allclose(data.read_image(recs[5])[..., 0], expect, atol=1e-6)
    coronal, _ = folders.list_images(tmp_path, scan=dict(axis="coronal"))
    assert len(coronal) == ref.shape[1] and coronal[0]["name"] == "t1.nii.gz#y=0"
    lo, hi = np.percentile(ref, (0.5, 99.5))                           # per volume, not per slice
    np.testing.assert_allclose(data.read_image(coronal[3])[..., 0], radiological(np.clip((ref[:, 3] - lo) / (hi - lo), 0, 1)),
                               atol=1e-6)


def test_nifti_masks_must_share_the_grid(tmp_path):
    volume = np.zeros((40, 36, 34), np.float32)
    volume[3:18, 5:7, 2:20] = 1                              # voxel axis j is world +z: two axial slices
    img = write_volume(tmp_path / "ct.nii.gz", volume * 50, AFFINE)
    mask = write_volume(tmp_path / "seg.nii.gz", volume.astype(np.uint8) * 2, AFFINE)
    canonical_mask = np.asarray(nib.as_closest_canonical(nib.load(mask)).dataobj) > 0
    recs = data.scan_records(img, "ct", 1, "lesion", mask)
    for r in recs:
        i, m = r["index"], data.read_mask(r, data.read_image(r).shape[:2])
        np.testing.assert_array_equal(m, radiological(canonical_mask[:, :, i]))
    assert sum(data.read_mask(r, data.read_image(r).shape[:2]).any() for r in recs) == 2
    other = write_volume(tmp_path / "other.nii.gz", volume, np.eye(4))
    with pytest.raises(data.DataError, match="other.nii.gz: mask grid .* does not match its image"):
        data.read_mask(data.scan_records(img, "ct", 1, "lesion", other)[0], (40, 34))


def test_nifti_2d_empty_slices_and_a_lying_header(tmp_path):
    write_volume(tmp_path / "xray.nii", np.linspace(0, 1, 2000, dtype=np.float32).reshape(40, 50), np.eye(4))
    volume = np.zeros((40, 40, 8), np.float32)
    volume[10:30, 10:30, 3:5] = 1
    write_volume(tmp_path / "vol.nii.gz", volume, np.eye(4))
    recs, _ = folders.list_images(tmp_path, scan=dict(skip_empty=True))
    assert [r["name"] for r in recs] == ["vol.nii.gz#z=3", "vol.nii.gz#z=4", "xray.nii"]
    path = write_volume(tmp_path / "lie.nii", np.ones((32, 32, 32), np.float32), np.eye(4))
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    with pytest.raises(scans.ScanError, match="lie.nii: NIfTI data shorter than its header says"):
        scans.read_nifti(path, 0)


def test_a_mediclip_split_may_list_dicoms(tmp_path):
    base = tmp_path / "ctset"
    (base / "images" / "test").mkdir(parents=True)
    (base / "samples").mkdir()
    lines = []
    for i, label in enumerate([0, 1]):
        write_dicom(base / "images" / "test" / f"{i}.dcm", RAMP + 100 * i, WindowCenter=2048, WindowWidth=4096)
        lines.append(json.dumps(dict(filename=f"test/{i}.dcm", label=label)))
    (base / "samples" / "test.json").write_text("\n".join(lines))
    recs = data.load_split("ctset", tmp_path, "test")
    assert [(r["name"], r["label"]) for r in recs] == [("test/0.dcm", 0), ("test/1.dcm", 1)]
    x, m = data.load_images(recs, 64)
    assert x.shape == (2, 3, 64, 64) and not m.any()


def test_a_volume_of_maps_lands_on_the_input_grid(tmp_path):
    """write_map_volume undoes the display rotation and the reorientation: read back through nibabel's canonical
    view, slice k shows the map exactly where it was drawn."""
    volume = np.random.default_rng(0).normal(size=(40, 36, 34)).astype(np.float32)
    path = write_volume(tmp_path / "t1.nii.gz", volume, AFFINE)
    n, _ = scans.count_images(path, "axial")
    shown = scans.read_nifti(path, 7, "axial")                                    # (H, W) as displayed
    amap = np.zeros(shown.shape, np.float16)
    amap[:5, -9:] = 1                                                            # top right of the display
    out = str(tmp_path / "map.nii.gz")
    exports.write_nifti_map(path, [(7, amap)], "axial", out)
    saved = nib.load(out)
    assert saved.shape == volume.shape and np.allclose(saved.affine, AFFINE)
    back = np.asarray(nib.as_closest_canonical(saved).dataobj)
    np.testing.assert_allclose(radiological(back[:, :, 7]), amap.astype(np.float32), atol=1e-6)
    assert back[:, :, [k for k in range(n) if k != 7]].max() == 0


def test_own_scans_end_to_end_with_anomalib_fields(tmp_path):
    import evaluate
    from conftest import TINY_CLIP
    d = tmp_path / "study"
    d.mkdir()
    write_volume(d / "t1.nii.gz", np.random.default_rng(0).normal(size=(40, 36, 34)).astype(np.float32), AFFINE)
    write_dicom(d / "ct.dcm", RAMP, WindowCenter=2048, WindowWidth=4096)
    evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images", str(d),
                                       "--out", str(tmp_path / "out"), "--save-maps", "--overlays", "1"]))
    rows = list(__import__("csv").DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 1 + 36 and rows[1]["name"] == "t1.nii.gz#z=0"          # canonical z: the volume's j axis
    assert {"pred_score", "pred_label", "gt_label"} <= set(rows[0]) and rows[0]["gt_label"] == ""
    maps = tmp_path / "out" / "maps"
    assert np.load(maps / "ct.npz")["anomaly_map"].shape == (64, 64)
    assert nib.load(maps / "t1.nii.gz").shape == (40, 36, 34)


def test_a_folder_of_odd_files_skips_each_with_one_line(tmp_path):
    """nibabel's 4D examples, a DICOM SEG, pydicom's RTDOSE (15 tiny frames) and an empty .dcm are skipped, each
    with one reason that names it; the one real image is still read."""
    import os
    import shutil
    nib_data = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
    for name in ("example4d.nii.gz", "example_nifti2.nii.gz"):
        shutil.copy(os.path.join(nib_data, name), tmp_path / name)
    shutil.copy(pydicom.data.get_testdata_file("rtdose.dcm"), tmp_path / "rtdose.dcm")
    write_dicom(tmp_path / "seg.dcm", RAMP, Modality="SEG")
    (tmp_path / "empty.dcm").write_bytes(b"")
    write_dicom(tmp_path / "ct.dcm", RAMP, Modality="CT")
    recs, other = folders.list_images(tmp_path)
    assert [r["name"] for r in recs] == ["ct.dcm"]
    reasons = {os.path.basename(p): why for p, why in other}
    assert len(other) == 5 and all("\n" not in why for why in reasons.values())
    assert "4D NIfTI" in reasons["example4d.nii.gz"] and "give one 3D volume" in reasons["example4d.nii.gz"]
    assert "example_nifti2.nii.gz" in reasons["example_nifti2.nii.gz"]
    assert "a DICOM SEG object (a segmentation), not an image" in reasons["seg.dcm"]
    assert "a DICOM RTDOSE object" in reasons["rtdose.dcm"]
    assert reasons["empty.dcm"].endswith("empty.dcm: empty file (0 bytes)")
    # a multi-frame image too small to score: one line for the file, its frames counted
    write_dicom(tmp_path / "tiny.dcm", np.zeros((15, 10, 12)))
    _, other = folders.list_images(tmp_path)
    assert [why for p, why in other if p.endswith("tiny.dcm")] == \
        [f"{tmp_path}/tiny.dcm: 15 frame(s) of 12x10 px, smaller than 32 px on a side"]
