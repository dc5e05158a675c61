"""Studies, not slices: DICOM series read as volumes (against SimpleITK), malformed series in one line each,
training on k normal studies, studies.csv, study-level metrics, and MOOD's file interface scored as MOOD does."""
import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import augment
import data
import evaluate
import exports
import scans
import series
import studies
import toy_volumes
import train
from test_train_eval import TINY


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy set (the MNI152 template at 4 mm) in MVFA's and MOOD's layouts, the test studies also as series."""
    pytest.importorskip("nilearn", reason="the toy set is made from nilearn's MNI152 template (requirements.txt has "
                        "it; the GPU image does not)")
    root = tmp_path_factory.mktemp("toy")
    truth = toy_volumes.make_set(str(root / "toy"), normal_train=2, normal_test=2, anomalous=4, zoom=0.5, dicom=True)
    return root, truth


@pytest.fixture(scope="module")
def run(toy):
    root, _ = toy
    args = TINY.copy()
    args[args.index("--data") + 1], args[args.index("--shots") + 1] = "toy", "2"
    return train.main(train.parse_args(args + ["--data-root", str(root), "--out", str(root / "run")]))


def small_volume(shape=(40, 36, 8), seed=0):
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, np.float32)
    v[5:35, 5:31] = 0.5 + 0.1 * rng.random((30, 26, shape[2]))
    return v, np.diag([0.8, 0.8, 2.5, 1.0])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- series
def test_series_order_and_geometry_match_simpleitk(toy):
    sitk = pytest.importorskip("SimpleITK", reason="the reference DICOM reader (requirements.txt has it)")
    root, _ = toy
    folder = str(root / "toy" / "dicom" / "case_03")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))    # shuffled names: order from headers
    found, singles, bad = series.find_series(paths, os.path.dirname(folder))
    assert len(found) == 1 and not singles and not bad and found[0]["name"] == "case_03"
    s = found[0]
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(folder, s["uid"])
    assert list(files) == list(s["files"])
    reader.SetFileNames(files)
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ lps, s["affine"], atol=1e-4)   # LPS -> RAS; DICOM decimal strings of mm
    # the slices are the NIfTI's, in order: our volume against SimpleITK's voxels
    ours = series.read_volume(s["files"])                                               # (Z, H, W) windowed
    theirs = sitk.GetArrayFromImage(img).astype(np.float32)                             # (Z, H, W) rescaled
    assert ours.shape == theirs.shape
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


def test_malformed_series_one_line_each_and_the_rest_scored(tmp_path, run):
    rng = np.random.default_rng(0)
    v, a = small_volume()
    two = tmp_path / "scans" / "two"                                        # two series in one folder
    toy_volumes.write_series(v, a, str(two), rng, series_number=1)
    toy_volumes.write_series(v[::-1], a, str(two), rng, series_number=2, names=[f"b{i}" for i in range(8)])
    toy_volumes.write_series(v, a, str(tmp_path / "scans" / "gap"), rng, skip=(4,))
    dup = tmp_path / "scans" / "dup"
    toy_volumes.write_series(v, a, str(dup), rng, names=[f"s{i}" for i in range(8)])
    shutil.copy(dup / "s3", dup / "zz_copy")
    mixed = tmp_path / "scans" / "mixed"
    uid = toy_volumes.write_series(v, a, str(mixed), rng, names=[f"m{i}" for i in range(8)])
    toy_volumes.write_series(small_volume((48, 48, 1))[0], a, str(mixed), rng, names=["localiser"], uid=uid)
    import pydicom
    broken = tmp_path / "scans" / "broken"
    toy_volumes.write_series(v, a, str(broken), rng, names=[f"x{i}" for i in range(8)])
    ds = pydicom.dcmread(broken / "x2")
    del ds.ImagePositionPatient, ds.InstanceNumber
    ds.save_as(broken / "x2")
    toy_volumes.save_nifti(v, a, str(tmp_path / "scans" / "vol.nii.gz"))     # a volume among the series
    m = evaluate.main(evaluate.parse_args(["--ckpt", run, "--images", str(tmp_path / "scans"), "--out",
                                           str(tmp_path / "out"), "--overlays", "0", "--all-slices"]))
    assert m is None
    rows = {r["study"]: r for r in read_csv(tmp_path / "out" / "studies.csv")}
    assert {k for k, r in rows.items() if r["kind"] == "dicom series"} == {"two@1", "two@2", "gap", "mixed"}
    assert rows["vol.nii.gz"]["kind"] == "nifti volume"
    assert rows["gap"]["slices_scored"] == "7" and "gap" in rows["gap"]["notes"]
    assert rows["mixed"]["slices_scored"] == "8" and "mixed image sizes" in rows["mixed"]["notes"]
    assert len(rows["mixed"]["files"].split(";")) == 8 and "scored on its own" in rows["mixed/localiser"]["notes"]
    # series that cannot be one volume: every file scored on its own, with why; nothing skipped, nothing lost
    dup = [r for k, r in rows.items() if k.startswith("dup/")]
    assert len(dup) == 9 and all("share a slice position" in r["notes"] for r in dup)
    broken = [r for k, r in rows.items() if k.startswith("broken/")]
    assert len(broken) == 8 and all("have no order" in r["notes"] for r in broken)
    assert not (tmp_path / "out" / "skipped.csv").exists()


def test_series_folders_are_entries_of_both_layouts(tmp_path):
    """MVFA's img/ and MediCLIP's JSON may name a DICOM series' folder: one study, its slices as records."""
    rng = np.random.default_rng(1)
    v, a = small_volume()
    img = tmp_path / "mvfa" / "valid" / "good" / "img"
    for name in ("s1", "s2"):
        toy_volumes.write_series(v, a, str(img / name), rng)
    shots = data.sample_shots(data.load_split("mvfa", str(tmp_path), "train"), 2, seed=0)
    assert sorted(data.study_of(s[0]) for s in shots) == ["valid/good/img/s1", "valid/good/img/s2"]
    base = tmp_path / "mc"
    toy_volumes.write_series(v, a, str(base / "images" / "case"), rng)
    (base / "samples").mkdir()
    (base / "samples" / "train.json").write_text('{"filename": "case", "label": 0}\n')
    recs = data.load_split("mc", str(tmp_path), "train")
    assert {data.study_of(r) for r in recs} == {"case"} and all(r["series"] for r in recs)


# ---------------------------------------------------------------------------------------------- studies
def test_training_on_k_normal_studies_records_studies_and_slices(run):
    ckpt = torch.load(run, weights_only=True)
    assert sorted(ckpt["shots"]) == ["valid/good/img/train_00.nii.gz", "valid/good/img/train_01.nii.gz"]
    assert not any("#" in s for s in ckpt["shots"])
    slices = ckpt["view_slices"]
    assert len(slices) == 2 * ckpt["config"]["views"] and all("#z=" in s for s in slices)
    assert {s.split("#")[0] for s in slices} == set(ckpt["shots"])


def test_empty_slices_are_not_views(toy):
    root, _ = toy
    pool = data.load_split("toy", str(root), "train")
    every = data.load_split("toy", str(root), "train", scan=dict(skip_empty=False))
    assert 0 < len(pool) < len(every)
    assert all(data.has_anatomy(data.read_image(r)) for r in pool)
    shots = data.sample_shots(pool, 2, seed=3)
    views = augment.view_records(shots, 6, seed=3)
    assert [r["name"] for r in views] == [r["name"] for r in augment.view_records(shots, 6, seed=3)]
    assert len({r["name"] for r in views}) == 12                        # without replacement within a study


def test_studies_csv_and_study_metrics(toy, run, tmp_path):
    root, truth = toy
    m = evaluate.main(evaluate.parse_args(["--ckpt", run, "--out", str(tmp_path), "--overlays", "0",
                                           "--bootstrap", "20"]))
    rows = read_csv(tmp_path / "studies.csv")
    assert len(rows) == len(truth) and {os.path.basename(r["study"]) for r in rows} == set(truth)
    for r in rows:
        assert r["kind"] == "nifti volume" and int(r["slices_scored"]) > 1 and r["probability"] == ""
        assert r["peak_slice"].startswith(r["study"] + "#z=") and os.path.isfile(tmp_path / r["map"])
        assert int(r["label"]) == truth[os.path.basename(r["study"])][0]
    block = next(v for k, v in m.items() if "studies" in k)
    assert 0 <= next(v for k, v in block.items() if "AUROC" in k) <= 1 and block["studies"] == len(truth)
    scores = read_csv(tmp_path / "scores.csv")
    assert len(scores) == sum(int(r["slices_scored"]) for r in rows)          # per-slice rows as before


def test_calib_split_is_by_study(toy, run, tmp_path):
    m = evaluate.main(evaluate.parse_args(["--ckpt", run, "--out", str(tmp_path), "--overlays", "0",
                                           "--bootstrap", "0", "--calib-split", "0.5"]))
    rows = read_csv(tmp_path / "studies.csv")
    assert all(r["probability"] != "" for r in rows)
    fit = {r["name"].split("#")[0] for r in read_csv(tmp_path / "scores.csv") if r.get("calibration_fit") == "1"}
    assert m["studies"]["studies"] + len(fit) == len(rows)


def test_study_score_rules():
    records = [dict(name=f"v.nii.gz#z={i}", label=0) for i in range(3)] + [dict(name="a.png", label=1)]
    maps = np.zeros((4, 8, 8), np.float16)
    maps[1, 2, 2], maps[3] = 0.9, 0.5
    groups = studies.group(records)
    s, peak = studies.study_scores(maps, maps.reshape(4, -1).max(1).astype(float), groups, "max")
    assert [g for g, _ in groups] == ["v.nii.gz", "a.png"] and list(peak) == [1, 3]
    assert np.allclose(s, [0.9, 0.5], atol=1e-3)            # the maps are float16: 0.9 is 0.8999 there
    s, _ = studies.study_scores(maps, None, groups, "top-voxels")
    assert np.isclose(s[0], 0.09, atol=1e-3) and np.isclose(s[1], 0.5, atol=1e-3)    # top 10 voxels of 192


# ---------------------------------------------------------------------------------------------- MOOD
def mood_ap(pred_dir, label_dir, task):
    """Average precision as MOOD's evaluation reads the files: labels from toy_label/<task>, predictions of the
    same name (a missing one counts 0), clipped to [0, 1], pooled over samples or voxels."""
    preds, labels = [], []
    for name in sorted(os.listdir(label_dir)):
        pred = os.path.join(pred_dir, name)
        if task == "sample":
            labels.append([int(open(os.path.join(label_dir, name)).readline())])
            preds.append([np.clip(float(open(pred).readline()), 0, 1) if os.path.exists(pred) else 0.0])
        else:
            y = np.clip(np.rint(nib.load(os.path.join(label_dir, name)).get_fdata()), 0, 1) == 1
            p = nib.load(pred).get_fdata(dtype=np.float32) if os.path.exists(pred) else np.zeros(y.shape)
            assert p.shape == y.shape
            labels.append(y.ravel())
            preds.append(np.clip(p, 0, 1).ravel())
    return average_precision_score(np.concatenate(labels), np.concatenate(preds))


@pytest.mark.parametrize("task", ["sample", "pixel"])
def test_mood_files_are_what_moods_evaluation_reads(toy, run, tmp_path, task):
    root, truth = toy
    mood = root / "toy" / "mood"
    out = tmp_path / "mood"
    evaluate.main(evaluate.parse_args(["--ckpt", run, "--images", str(mood / "toy"), "--out", str(tmp_path / "ev"),
                                       "--overlays", "0", "--mood-out", str(out), "--mood-task", task]))
    labels = sorted(os.listdir(mood / "toy_label" / task))
    assert sorted(os.listdir(out)) == labels                                   # a file for every input volume
    for name in labels:
        if task == "sample":
            s = float(open(out / name).read())
            assert 0 <= s <= 1
        else:
            pred, src = nib.load(out / name), nib.load(mood / "toy" / name)
            assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
            v = pred.get_fdata()
            assert v.min() >= 0 and v.max() <= 1 and (v == 0).all(axis=(0, 1)).any()   # empty slices: 0
    ap = mood_ap(str(out), str(mood / "toy_label" / task), task)
    prevalence = np.mean([t[0] for t in truth.values()]) if task == "sample" else None
    assert 0 < ap <= 1 and (prevalence is None or ap >= prevalence / 2)


def test_slices_take_their_labels_from_the_voxel_mask(tmp_path):
    """A tumour spanning 3 of 10 slices: those 3 slices are anomalous, the other 7 normal; the study stays
    anomalous (its own label), and a normal study's slices are all normal."""
    v, a = small_volume((40, 36, 10))
    mask = np.zeros(v.shape, np.uint8)
    mask[12:20, 10:18, 4:7] = 1
    for group, m in (("Ungood", mask), ("good", None)):
        (tmp_path / "toy" / "test" / group / "img").mkdir(parents=True)
        toy_volumes.save_nifti(v, a, str(tmp_path / "toy" / "test" / group / "img" / "case.nii.gz"))
        if m is not None:
            (tmp_path / "toy" / "test" / group / "anomaly_mask").mkdir()
            toy_volumes.save_nifti(m, a, str(tmp_path / "toy" / "test" / group / "anomaly_mask" / "case.nii.gz"))
    recs = data.load_split("toy", tmp_path, "test", scan=dict(skip_empty=False))
    sick = [r for r in recs if "Ungood" in r["name"]]
    assert [r["label"] for r in sick] == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert all(r["study_label"] == 1 for r in sick)
    groups = studies.group(recs)
    assert dict(zip([g for g, _ in groups], studies.study_labels(recs, groups))) == \
        {"test/Ungood/img/case.nii.gz": 1, "test/good/img/case.nii.gz": 0}
    assert all(r["label"] == 0 for r in recs if "/good/" in r["name"])


def test_nifti_and_dicom_series_of_one_volume_show_the_same_picture(tmp_path):
    """One display convention (radiological: the patient's right on the image's left, as DICOM series are
    stored and clinical viewers show them) for NIfTI slices and series slices alike, and the sides said."""
    v, a = small_volume()
    v[5:12, 20:31, :] += 0.4                               # something on one side only: a mirror would show
    nii = toy_volumes.save_nifti(v, a, str(tmp_path / "vol.nii.gz"))
    toy_volumes.write_series(v, a, str(tmp_path / "dcm"), np.random.default_rng(0))
    paths = sorted(str(p) for p in (tmp_path / "dcm").iterdir())
    (s,), _, _ = series.find_series(paths, str(tmp_path))
    for k in (2, 5):
        n, d = scans.read_nifti(nii, k, "axial"), series.read_slice(s["files"], k)
        assert n.shape == d.shape
        corr = lambda x: np.corrcoef(x.ravel(), d.ravel())[0, 1]
        assert corr(n) > 0.999 and corr(np.fliplr(n)) < 0.95
    assert exports.display_sides({"series": s}) == ("R", "L")
    assert exports.display_sides(dict(path=nii, index=0, scan=dict(axis="axial"))) == ("R", "L")
    assert exports.display_sides(dict(path=nii, index=0, scan=dict(axis="sagittal"))) == ("A", "P")
