"""Tests for data.py: layouts, shot sampling, robust image/mask reading, resizing and augmentation (CPU, fast)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augment  # noqa: E402
import data  # noqa: E402
import folders  # noqa: E402
from data import DataError  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


def save(path, arr_or_im, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    im.save(path, **kw)
    return str(path)


def rgb(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -----------------------------------------------------------------------------
# synthetic

@pytest.fixture(scope="module")
def synth():
    return {s: data.load_split("synthetic", "", s, seed=0) for s in ("train", "test")}


def test_synthetic_shapes_and_labels(synth):
    train, test = synth["train"], synth["test"]
    assert len(train) == 16 and all(r["label"] == 0 for r in train)
    assert sorted(r["label"] for r in test) == [0] * 12 + [1] * 12
    assert {r["cls"] for r in test} == {"normal", "hyper", "hypo"}
    assert [r["name"] for r in test] == sorted(r["name"] for r in test)
    for r in train + test:
        img = data.read_image(r)
        assert img.shape == (224, 224, 3) and img.dtype == np.float32
        assert img.min() >= 0 and img.max() <= 1
        m = data.read_mask(r, img.shape[:2])
        assert m.dtype == bool and m.shape == (224, 224)
        assert m.any() == (r["label"] == 1)


def test_synthetic_deterministic(synth):
    again = data.load_split("synthetic", "", "test", seed=0)
    for a, b in zip(synth["test"], again):
        assert np.array_equal(a["image"], b["image"])
        assert (a["mask"] is None and b["mask"] is None) or np.array_equal(a["mask"], b["mask"])
    other = data.load_split("synthetic", "", "test", seed=1)
    assert not np.array_equal(synth["test"][0]["image"], other[0]["image"])
    assert not any(np.array_equal(t["image"], s["image"]) for t in synth["test"] for s in synth["train"])


# -----------------------------------------------------------------------------
# MediCLIP layout

@needs_shared
def test_real_brainmri_counts():
    train = data.load_split("brainmri", str(SHARED), "train")
    test = data.load_split("brainmri", str(SHARED), "test")
    assert len(train) == 32 and all(r["label"] == 0 for r in train)
    labels = [r["label"] for r in test]
    assert labels.count(0) == 65 and labels.count(1) == 155


@needs_shared
def test_real_busi_counts_and_mask():
    test = data.load_split("busi", str(SHARED), "test")
    labels = [r["label"] for r in test]
    assert labels.count(0) == 101 and labels.count(1) == 647
    assert {r["cls"] for r in test} == {"benign", "malignant", "normal"}
    rec = next(r for r in test if r["label"] == 1)
    img = data.read_image(rec)
    m = data.read_mask(rec, img.shape[:2])
    assert m.dtype == bool and m.shape == img.shape[:2] and m.any()


def test_mediclip_malformed_line(tmp_path):
    base = tmp_path / "toy"
    save(base / "images" / "a.png", rgb())
    (base / "samples").mkdir()
    lines = [json.dumps({"filename": "a.png", "label": 0}), "", '{"filename": "b.png", "label": ']
    (base / "samples" / "test.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test\.json:3"):
        data.load_split("toy", str(tmp_path), "test")
    (base / "samples" / "test.json").write_text(lines[0] + "\n" + json.dumps({"label": 1}) + "\n")
    with pytest.raises(DataError, match=r"test\.json:2.*filename"):
        data.load_split("toy", str(tmp_path), "test")


def test_no_dataset_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset here"):
        data.load_split("empty", str(tmp_path), "test")
    with pytest.raises(DataError, match="nowhere"):
        data.load_split("busi", str(tmp_path / "nowhere"), "test")


# -----------------------------------------------------------------------------
# MVFA layout

def test_mvfa_layout(tmp_path):
    base = tmp_path / "Brain_AD"
    for sub, group, fn in [("valid", "good", "v1.png"), ("valid", "good", "v2.png"), ("test", "good", "g1.png"),
                           ("test", "Ungood", "u1.png"), ("test", "Ungood", "u2.png")]:
        save(base / sub / group / "img" / fn, rgb(32, 32))
    save(base / "test" / "Ungood" / "anomaly_mask" / "u1.png", np.full((32, 32), 255, np.uint8))
    train = data.load_split("Brain_AD", str(tmp_path), "train")
    assert [r["name"] for r in train] == ["valid/good/img/v1.png", "valid/good/img/v2.png"]
    test = {r["name"].split("/")[-1]: r for r in data.load_split("Brain_AD", str(tmp_path), "test")}
    assert {k: v["label"] for k, v in test.items()} == {"g1.png": 0, "u1.png": 1, "u2.png": 1}
    assert test["u1.png"]["mask_path"] is not None and test["u2.png"]["mask_path"] is None
    assert data.read_mask(test["u1.png"], (32, 32)).all()
    assert not data.read_mask(test["u2.png"], (32, 32)).any()


# -----------------------------------------------------------------------------
# list_images, sample_shots

def test_list_images(tmp_path):
    for p in ["a.PNG", "sub/b.jpg", "sub/deeper/c.tiff", "sub/d.Jpeg"]:
        save(tmp_path / "f" / p, rgb(32, 32))
    (tmp_path / "f" / "notes.txt").write_text("x")
    recs, other = folders.list_images(str(tmp_path / "f"))
    assert [r["name"] for r in recs] == ["a.PNG", "sub/b.jpg", "sub/d.Jpeg", "sub/deeper/c.tiff"]
    assert len(other) == 1 and ".txt is not a format read here" in other[0][1]     # said, not dropped silently
    assert all(r["label"] == -1 and r["cls"] == "unknown" for r in recs)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images here .*tiff, DICOM and NIfTI"):   # every format read is named
        folders.list_images(str(tmp_path / "e"))
    with pytest.raises(DataError, match="missing"):
        folders.list_images(str(tmp_path / "missing"))


def test_sample_shots():
    recs = [{"name": f"n{i:02d}", "label": 0} for i in range(20)] + [{"name": "x", "label": 1}]
    a, b = data.sample_shots(recs, 3, seed=0), data.sample_shots(recs[::-1], 3, seed=0)
    assert all(len(s) == 1 for s in a)                                   # a plain image is a study of one
    assert [s[0]["name"] for s in a] == [s[0]["name"] for s in b] and all(s[0]["label"] == 0 for s in a)
    firsts = {data.sample_shots(recs, 1, seed=s)[0][0]["name"] for s in range(10)}
    assert len(firsts) > 1
    with pytest.raises(DataError, match="20"):
        data.sample_shots(recs, 21, seed=0)
    with pytest.raises(DataError):
        data.sample_shots(recs, 0, seed=0)


# -----------------------------------------------------------------------------
# read_image / read_mask

def check_rgb(img, hw):
    assert img.shape == (*hw, 3) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1


def test_read_image_modes(tmp_path):
    a16 = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 20 + 1000)
    p = save(tmp_path / "i16.png", Image.fromarray(a16))
    assert Image.open(p).mode.startswith("I")
    img = data.read_image({"path": p})
    check_rgb(img, (40, 48))
    assert img.min() == 0 and img.max() == 1 and np.array_equal(img[..., 0], img[..., 2])

    rgba = np.dstack([rgb(), np.zeros((40, 48), np.uint8)])  # fully transparent -> black
    img = data.read_image({"path": save(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))})
    check_rgb(img, (40, 48))
    assert img.max() == 0

    pal = Image.fromarray(rgb()).convert("P", palette=Image.Palette.ADAPTIVE)
    check_rgb(data.read_image({"path": save(tmp_path / "p.png", pal)}), (40, 48))

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = save(tmp_path / "rot.jpg", Image.fromarray(rgb(40, 64)), exif=exif)
    check_rgb(data.read_image({"path": p}), (64, 40))


def test_read_image_errors(tmp_path):
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    full = Path(save(tmp_path / "full.jpg", Image.fromarray(rgb(128, 128)), quality=95)).read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(full[: len(full) // 2])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    tiny = save(tmp_path / "tiny.png", rgb(16, 16))
    for p in [zero, trunc, text, tiny, tmp_path / "absent.png"]:
        with pytest.raises(DataError) as e:
            data.read_image({"path": str(p)})
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_read_mask(tmp_path):
    grey = np.array([[0, 100, 127, 128, 200, 255]], np.uint8).repeat(4, 0)
    p = save(tmp_path / "m.png", grey)
    m = data.read_mask({"mask_path": p}, (4, 6))
    assert m.dtype == bool and m[0].tolist() == [False, False, False, True, True, True]
    with pytest.raises(DataError, match=r"m\.png.*6x4.*8x8"):
        data.read_mask({"mask_path": p}, (8, 8))
    with pytest.raises(DataError, match="nomask"):
        data.read_mask({"mask_path": str(tmp_path / "nomask.png")}, (4, 6))
    assert not data.read_mask({"mask_path": None}, (5, 7)).any()


# -----------------------------------------------------------------------------
# load_images / augment_views

def test_load_images_and_augment(synth):
    recs = synth["test"][:2] + synth["test"][-2:]  # two anomalies, two normals
    x, m = data.load_images(recs, 64)
    assert x.shape == (4, 3, 64, 64) and m.shape == (4, 1, 64, 64)
    assert x.dtype == m.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[:2].sum() > 0 and m[2:].sum() == 0

    v = augment.augment_views(x[:2], 4, seed=0)
    assert v.shape == (8, 3, 64, 64) and 0 <= v.min() and v.max() <= 1
    assert torch.equal(v[0], x[0]) and torch.equal(v[4], x[1])
    assert not torch.equal(v[1], x[0])
    assert torch.equal(v, augment.augment_views(x[:2], 4, seed=0))
    assert not torch.equal(v, augment.augment_views(x[:2], 4, seed=1))


def test_a_missing_dataset_says_where_it_comes_from_and_which_flag(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_split("brainmri", tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert "Kaggle" in msg and "cnulab/MediCLIP" in msg and "--data-root" in msg and "does not exist" in msg


def test_a_typod_dataset_name_suggests_the_nearest(tmp_path):
    (tmp_path / "brainmri").mkdir()
    (tmp_path / "busi").mkdir()
    with pytest.raises(data.DataError, match=r"dataset 'brianmri' not found .*; did you mean brainmri\? "
                                             r"\(here: brainmri, busi\)"):
        data.load_split("brianmri", tmp_path, "train")
    with pytest.raises(data.DataError, match="did you mean busi"):
        data.load_split("bussi", tmp_path / "nowhere", "train")        # a known name, not downloaded yet
