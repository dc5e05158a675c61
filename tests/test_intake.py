"""Any folder, by construction (folders.py): a corpus of every kind of file the issue names, made here with
pydicom, nibabel and PIL; an exception injected into every reader and grouping step in turn; and seeded random
folders of valid, truncated, renamed, empty, duplicated and unreadable files. Each time: every file exactly once
in the ledger (scored or skipped), the tally adds up, and the run goes on."""
import os
import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

import data
import folders
import scans
import series
import sniff
import toy_volumes
from test_scans import RAMP, write_dicom


def picture(path, seed=0, size=96):
    Image.fromarray((np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)).save(path, format="PNG")
    return str(path)


def volume(seed=0, shape=(40, 44, 12)):
    """Anatomy in the middle, air around it."""
    v = np.zeros(shape, np.float32)
    inner = tuple(slice(n // 6, n - n // 6) if n > 2 else slice(None) for n in shape)
    v[inner] = 1 + np.random.default_rng(seed).random(v[inner].shape)
    return v


def echoes(folder):
    """One SeriesInstanceUID holding two echoes at the same positions (as scanners write a dual-echo series)."""
    uid = toy_volumes.write_series(volume(1), np.diag([2.0, 2.0, 3.0, 1.0]), str(folder), np.random.default_rng(0))
    first = sorted(os.listdir(folder))
    toy_volumes.write_series(volume(2), np.diag([2.0, 2.0, 3.0, 1.0]), str(folder), np.random.default_rng(1),
                             uid=uid, names=[f"E2_{n}" for n in range(12)])
    for name in os.listdir(folder):
        ds = pydicom.dcmread(folder / name)
        ds.EchoNumbers = 1 if name in first else 2
        ds.save_as(folder / name)


def make_corpus(root):
    """Every class of issue 41, one or more files each; returns {file name: what it is}."""
    root.mkdir(parents=True, exist_ok=True)
    write_dicom(root / "renamed.img", RAMP)                          # DICOM under other names
    write_dicom(root / "i22.MRDC.1", RAMP)
    write_dicom(root / "MR.1.3.12.2.1107", RAMP)
    write_dicom(root / "noext", RAMP)
    echoes(root / "dual_echo")
    toy_volumes.write_series(volume(3), np.diag([2.0, 2.0, 3.0, 1.0]), str(root / "tilted"), np.random.default_rng(2))
    for name in os.listdir(root / "tilted"):
        ds = pydicom.dcmread(root / "tilted" / name)
        ds.GantryDetectorTilt = 18.5
        ds.save_as(root / "tilted" / name)
    rgba = np.zeros((40, 40, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    rgba["R"][5:35, 5:35] = np.random.default_rng(4).integers(50, 250, (30, 30, 6))
    rgba["G"], rgba["B"], rgba["A"] = rgba["R"] // 2, rgba["R"] // 3, 255
    nib.save(nib.Nifti1Image(rgba, np.eye(4)), root / "rgba.nii.gz")
    labels = np.zeros((40, 40, 6), np.uint8)
    labels[10:20, 10:20, 2:4], labels[25:30, 25:30, 1:3] = 1, 3
    nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels.nii.gz")
    picture(root / "case7.png", 7)
    Image.fromarray((np.random.default_rng(8).random((96, 96)) > 0.9).astype(np.uint8) * 255).save(root / "case7_mask.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(root / "blank.png")          # constant: empty
    big = nib.Nifti1Image(volume(5).astype(">f4"), np.eye(4))                       # big-endian voxels
    nib.save(big, root / "big_endian.nii")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(root / "one_pixel.png")
    nib.save(nib.Nifti1Image(volume(6)[:, :, 5:6], np.eye(4)), root / "one_slice.nii.gz")
    shutil.copy(root / "one_slice.nii.gz", root / "volume.dat")                     # NIfTI under another name
    picture(root / "photo.bin", 9)                                                   # a PNG under another name
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    raw = (root / "case7.png").read_bytes()
    (root / "truncated.png").write_bytes(raw[:len(raw) // 3])
    os.symlink(root / "nowhere", root / "broken_link.dcm")
    return {f: None for f in os.listdir(root)}


def accounted(folder, out):
    """The files found under folder, and the ledger's: scored (from the records' studies) and skipped."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    records, skipped = out
    scored = sorted({p for r in records for p in data.study_files(r)})
    return files, scored, [p for p, _ in skipped]


def check_once(folder, out):
    files, scored, skipped = accounted(folder, out)
    assert len(skipped) == len(set(skipped)) and not set(scored) & set(skipped)
    assert sorted(scored + skipped) == files
    return files, scored, dict(out[1])


def test_every_class_of_file_gets_one_entry_with_its_reason(tmp_path, capsys):
    make_corpus(tmp_path / "in")
    out = folders.own_images(tmp_path / "in")
    files, scored, skipped = check_once(tmp_path / "in", out)
    printed = capsys.readouterr().out
    assert f"files seen {len(files)} = scored {len(scored)} + skipped {len(skipped)}" in printed
    names = {os.path.relpath(p, tmp_path / "in"): why for p, why in skipped.items()}
    scored = {os.path.relpath(p, tmp_path / "in") for p in scored}
    assert {"renamed.img", "i22.MRDC.1", "MR.1.3.12.2.1107", "noext"} <= scored      # DICOM by content
    assert {"volume.dat", "photo.bin", "big_endian.nii", "one_slice.nii.gz", "rgba.nii.gz"} <= scored
    assert "a label map" in names["labels.nii.gz"] and "the mask of case7.png" in names["case7_mask.png"]
    assert "constant image" in names["blank.png"] and "empty file" in names["empty.png"]
    assert "not a format read here" in names["notes.txt"] and "broken_link.dcm" in names
    assert "truncated.png" in names and "one_pixel.png" in names
    studies = {r["name"].split("#")[0] for r in out[0]}
    assert {"dual_echo@echo1", "dual_echo@echo2"} <= studies                         # echoes apart
    assert "gantry tilt 18.5 deg" in printed


READERS = [(sniff, "kind"), (series, "find_series"), (series, "read_headers"), (data, "series_records"),
           (data, "scan_records"), (data, "read_image"), (scans, "read_dicom_header"), (scans, "load_nifti"),
           (folders, "label_map"), (folders, "mask_of")]


@pytest.mark.parametrize("module,name", READERS, ids=[f"{m.__name__}.{n}" for m, n in READERS])
def test_an_exception_in_any_reader_becomes_rows_and_the_run_goes_on(tmp_path, monkeypatch, module, name):
    make_corpus(tmp_path / "in")
    picture(tmp_path / "in" / "zz_plain.jpg", 11)
    real, calls = getattr(module, name), []

    def flaky(*args, **kw):                     # every other call fails, from inside a library as it were
        calls.append(1)
        if len(calls) % 2:
            raise RuntimeError("injected failure\nsecond line")
        return real(*args, **kw)
    monkeypatch.setattr(module, name, flaky)
    try:
        out = folders.own_images(tmp_path / "in")
    except data.DataError as e:                 # nothing readable is the one way to stop, in one line
        assert "no images here that could be read" in str(e) and "\n" not in str(e)
        return
    files, scored, skipped = check_once(tmp_path / "in", out)
    assert calls and all("\n" not in why and "second line" not in why for why in skipped.values())   # first line


def random_folder(root, seed):
    """A seeded mix of valid, truncated, renamed, empty, duplicated and unreadable files."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    picture(root / "anchor.png", seed)                       # one readable image: the run has something to score
    for i in range(rng.randint(4, 12)):
        kind = rng.choice(["png", "dicom", "nifti", "truncated", "renamed", "empty", "duplicate", "text", "link",
                           "nested"])
        name = root / f"f{i}"
        if kind == "png":
            picture(f"{name}.png", seed + i)
        elif kind == "dicom":
            write_dicom(f"{name}.dcm", RAMP, preamble=rng.random() < 0.5)
        elif kind == "nifti":
            nib.save(nib.Nifti1Image(volume(i, (32, 32, rng.randint(1, 4))), np.eye(4)), f"{name}.nii.gz")
        elif kind in ("truncated", "renamed", "duplicate"):
            src = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
            data_ = rng.choice(src).read_bytes()
            cut = data_[:rng.randint(0, len(data_))] if kind == "truncated" else data_
            (root / f"f{i}{rng.choice(['.png', '.dcm', '.nii.gz', '', '.x'])}").write_bytes(cut)
        elif kind == "empty":
            (root / f"f{i}.{rng.choice(['png', 'dcm', 'nii'])}").write_bytes(b"")
        elif kind == "text":
            (root / f"f{i}.txt").write_text("x" * rng.randint(0, 500))
        elif kind == "link":
            os.symlink(root / "missing", root / f"f{i}.png")
        else:
            (root / f"d{i}").mkdir()
            picture(root / f"d{i}" / ".hidden.png", i)


@pytest.mark.parametrize("seed", range(6))
def test_random_folders_every_file_once(tmp_path, seed, capsys):
    random_folder(tmp_path / "in", seed)
    out = folders.own_images(tmp_path / "in")
    files, scored, skipped = check_once(tmp_path / "in", out)
    assert f"files seen {len(files)} = scored {len(scored)} + skipped {len(skipped)}" in capsys.readouterr().out


def test_the_ledger_names_a_file_no_step_decided_on(tmp_path):
    ledger = folders.Ledger([str(tmp_path / "a"), str(tmp_path / "b")])
    ledger.score(str(tmp_path / "a"), "a")
    assert ledger.close() == "files seen 2 = scored 1 + skipped 1"
    assert "not accounted for by any step" in ledger.skipped()[0][1]
    with pytest.raises(AssertionError):
        ledger.score(str(tmp_path / "b"), "b")                    # a skipped file is never scored after


def test_own_images_get_their_own_folder_warnings_and_no_mixing(tmp_path, monkeypatch, capsys):
    """--images writes beside nothing of an earlier evaluation: a folder that holds one is refused in one line, or
    replaced whole with --overwrite; the warnings a dataset run prints (here random weights and an inverted
    calibration) are printed and written into summary.json as well."""
    import json
    import calibration
    import evaluate
    from conftest import TINY_CLIP
    (tmp_path / "in").mkdir()
    for i in range(2):
        picture(tmp_path / "in" / f"x{i}.png", i)
    real = calibration.calibrate

    def inverted(*args, **kw):
        probs, fit_probs, fit_labels, cal = real(*args, **kw)
        return probs, fit_probs, fit_labels, dict(cal or {}, warning="inverted: anomalies score below normals")
    monkeypatch.setattr(calibration, "calibrate", inverted)
    argv = ["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images", str(tmp_path / "in"), "--out",
            str(tmp_path / "out"), "--overlays", "2"]
    evaluate.main(evaluate.parse_args(argv))
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    printed = capsys.readouterr().out
    assert any("random backbone weights" in w for w in summary["warnings"])
    assert any("inverted" in w for w in summary["warnings"]) and "WARNING: calibration: inverted" in printed
    with pytest.raises(ValueError, match="holds an earlier evaluation .* --overwrite"):
        evaluate.main(evaluate.parse_args(argv))
    (tmp_path / "out" / "overlay_99_stale.png").write_bytes(b"x")
    evaluate.main(evaluate.parse_args(argv + ["--overwrite"]))
    assert not (tmp_path / "out" / "overlay_99_stale.png").exists()
    monkeypatch.chdir(tmp_path)                        # no --out: its own folder, images-<FOLDER>, not the run's
    evaluate.main(evaluate.parse_args(argv[:-4] + ["--overlays", "0"]))
    assert (tmp_path / "results" / "images-in" / "summary.json").exists()
