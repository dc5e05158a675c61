"""A folder of real files as a new user has them: every file of pydicom's and nibabel's own test data, nilearn's
MNI152 template, an empty .dcm, a DICOM SEG, a 4D NIfTI and three plain images, through evaluate.py --images.
It must finish, account for every file exactly once (scored via its study, or skipped) and say each file's
problem once, in a user's words."""
import csv
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
from PIL import Image

import evaluate
from conftest import TINY_CLIP
from test_scans import RAMP, write_dicom

LIBRARY_WORDS = ("0x0", "force=True", "object has no attribute", "Traceback")


def build_folder(root):
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn's MNI152 template (requirements.txt has it)")
    shutil.copytree(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files"), root / "pydicom")
    shutil.copytree(os.path.join(os.path.dirname(nib.__file__), "tests", "data"), root / "nibabel")
    nib.save(datasets.load_mni152_template(resolution=2), root / "mni152.nii.gz")
    (root / "empty.dcm").write_bytes(b"")
    write_dicom(root / "seg.dcm", RAMP, Modality="SEG")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 8, 3), np.float32), np.eye(4)), root / "fmri_4d.nii.gz")
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((96, 96)) * 255).astype(np.uint8)).save(root / f"mri{i}.jpg")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_every_file_of_a_real_folder_is_accounted_for_once(tmp_path, capsys):
    files = build_folder(tmp_path / "in")
    out = tmp_path / "out"
    evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images",
                                       str(tmp_path / "in"), "--out", str(out)]))
    printed = capsys.readouterr().out.splitlines()
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(out / "skipped.csv"))}
    studies = list(csv.DictReader(open(out / "studies.csv")))
    scored = [f for s in studies for f in s["files"].split(";")]
    scored_studies = {r["name"].split("#")[0] for r in csv.DictReader(open(out / "scores.csv"))}
    # each file exactly once, by its own path; every file of scores.csv traced to a study
    assert len(scored) == len(set(scored)) and not set(scored) & set(skipped)
    assert sorted(set(scored) | set(skipped)) == files
    assert scored_studies == {s["study"] for s in studies}
    assert f"files seen {len(files)} = scored {len(scored)} + skipped {len(skipped)}" in printed
    # the kinds the issue names were each read or said for what they are
    base = {os.path.basename(p): why for p, why in skipped.items()}
    assert "a DICOM waveform (an ECG)" in base["waveform_ecg.dcm"]
    assert "a DICOMDIR" in base["DICOMDIR"]
    assert "truncated: its pixel data holds" in base["MR_truncated.dcm"]
    assert "RTSTRUCT" in base["rtstruct.dcm"] and "lacks a DICOM header" in base["rtstruct.dcm"]
    assert "CIFTI-2" in base["row_major.dconn.nii"]
    assert "4D NIfTI" in base["fmri_4d.nii.gz"] and "SEG" in base["seg.dcm"] and "empty" in base["empty.dcm"]
    assert any("badVR.dcm" in p for p in list(skipped) + scored)
    # files of one series at one position (MR_small in five encodings) are scored one by one, with why
    mr = [s for s in studies if re.search(r"MR_small(_RLE|_implicit|_bigendian)?\.dcm$", s["files"])]
    assert len(mr) >= 3 and all("share a slice position" in s["notes"] for s in mr)
    assert {"mni152.nii.gz", "mri0.jpg"} <= {os.path.basename(f) for f in scored}
    # the user's words, and one line per file
    assert not [w for w in skipped.values() if any(x in w for x in LIBRARY_WORDS)]
    assert not [p for p in skipped if p.endswith("/.") or os.path.isdir(p)]
    for f in files:
        lines = [line for line in printed if line.startswith(("skipped ", "note: ")) and f + ":" in line]
        assert len(lines) <= 1, lines
