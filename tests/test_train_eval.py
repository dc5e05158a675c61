"""End to end: train.py then evaluate.py on the synthetic set with tiny models; determinism; checkpoints."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

import encode
import evaluate
import runfiles
import train
from conftest import ROOT, TINY_CLIP

TINY = ["--data", "synthetic", "--shots", "1", "--random-init", "--clip", TINY_CLIP, "--vae", "medvae_tiny_2d",
        "--unet", "tiny", "--projection", "tiny", "--views", "4", "--batch-size", "4", "--steps", "12",
        "--eta-warmup", "4", "--log-every", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path = train.main(train.parse_args(TINY + ["--out", str(out)]))
    return path


def test_train_writes_a_safe_checkpoint_and_a_log(run):
    ckpt = torch.load(run, weights_only=True)
    assert ckpt["format_version"] == runfiles.FORMAT_VERSION and ckpt["shots"] == ["train/normal_13"]
    assert set(ckpt["state_dicts"]) == {"eta", "projection", "mediclip"}
    assert ckpt["config"]["layers"] == [2, 3, 4] and len(ckpt["latent_std"]) == 1
    folder = os.path.dirname(run)
    rows = open(os.path.join(folder, "log.csv")).read().splitlines()
    assert rows[0].startswith("step,focal,dice,deco,align,total") and len(rows) == 1 + 4
    assert json.load(open(os.path.join(folder, "config.json")))["clip"] == TINY_CLIP
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_evaluate_rebuilds_from_the_checkpoint(run, tmp_path):
    m = evaluate.main(evaluate.parse_args(["--ckpt", run, "--out", str(tmp_path), "--overlays", "2"]))
    assert 0 <= m["image"]["auroc"] <= 1 and 0 <= m["pixel"]["aupro"] <= 1
    assert set(m["per_class"]) == {"hyper", "hypo"}
    assert m["conditions"]["shot_files"] == [["train/normal_13"]] and m["conditions"]["random_init"]
    assert len(m["conditions"]["checkpoint_sha256"][0]) == 64 and m["conditions"]["test_data"] == "synthetic"
    assert "warning" in m
    # the trust report: CIs, few-shot calibration, operating points
    lo, hi = m["image"]["auroc_ci95"]
    assert lo <= m["image"]["auroc"] <= hi and m["pixel"]["auroc_ci95"][0] <= m["pixel"]["auroc"]
    assert m["calibration"]["method"] == "platt" and m["calibration"]["fitted_on"].startswith("few-shot")
    assert m["calibration"]["n_normal"] == 4 and m["calibration"]["n_anomalous"] == 4   # 1 shot x 4 views
    assert 0 <= m["calibration"]["ece"] <= 1 and set(m["operating_points"]) == {"p>=0.5", "sensitivity>=0.95"}
    op = m["operating_points"]["sensitivity>=0.95"]
    assert op["sensitivity_on_fit_data"] >= 0.95 and set(op["per_class"]) == {"normal", "hyper", "hypo"}
    files = os.listdir(tmp_path)
    assert {"metrics.json", "scores.csv", "roc.png", "reliability.png"} <= set(files)
    assert sum(f.startswith("overlay_") for f in files) == 2
    assert len(open(tmp_path / "scores.csv").read().splitlines()) == 1 + 24
    # the same numbers under anomalib's names
    a = m["anomalib"]
    assert a["image_AUROC"] == m["image"]["auroc"] and a["pixel_AUPRO"] == m["pixel"]["aupro"]
    assert 0 <= a["image_F1Score"] <= 1 and a["image_AUPR"] == m["image"]["ap"]


def test_zero_shot_and_own_images(tmp_path):
    m = evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--data", "synthetic",
                                           "--out", str(tmp_path / "zs"), "--overlays", "1"]))
    assert m["conditions"]["shots"] == 0 and m["pixel"] is not None
    from PIL import Image
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(
            tmp_path / "imgs" / "sub" / f"{i}.png")
    assert evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images",
                                              str(tmp_path / "imgs"), "--out", str(tmp_path / "own")])) is None
    assert len(open(tmp_path / "own" / "scores.csv").read().splitlines()) == 4


def test_same_command_twice_gives_identical_checkpoints_and_metrics(run, tmp_path):
    again = train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    a, b = torch.load(run, weights_only=True), torch.load(again, weights_only=True)
    for part in a["state_dicts"]:
        for k, v in a["state_dicts"][part].items():
            assert torch.equal(v, b["state_dicts"][part][k]), (part, k)
    m1 = evaluate.main(evaluate.parse_args(["--ckpt", run, "--out", str(tmp_path / "e1"), "--overlays", "0"]))
    m2 = evaluate.main(evaluate.parse_args(["--ckpt", again, "--out", str(tmp_path / "e2"), "--overlays", "0"]))
    strip = lambda m: {k: v for k, v in m.items() if k != "conditions"}
    assert strip(m1) == strip(m2)


def test_latent_noise_control_and_patch_masks_train(tmp_path):
    path = train.main(train.parse_args(TINY + ["--synth", "latent-noise", "--synth-mask", "patches", "--out",
                                               str(tmp_path)]))
    assert torch.load(path, weights_only=True)["config"]["synth"] == "latent-noise"


@pytest.mark.parametrize("case", ["missing", "truncated", "not_torch", "pickled", "newer", "other_backbone",
                                  "other_layers"])
def test_bad_checkpoints_are_refused_clearly(run, tmp_path, case):
    path = tmp_path / "bad.pt"
    args = ["--ckpt", str(path)]
    if case == "truncated":
        path.write_bytes(open(run, "rb").read()[:1000])
    elif case == "not_torch":
        path.write_text("hello")
    elif case == "pickled":
        with open(path, "wb") as f:     # a checkpoint that would run code if unpickled
            pickle.dump({"format_version": 1, "state_dicts": {}, "x": os.system}, f)
    elif case == "newer":
        ckpt = torch.load(run, weights_only=True)
        ckpt["format_version"] = runfiles.FORMAT_VERSION + 1
        torch.save(ckpt, path)
    elif case == "other_backbone":
        path = run
        args = ["--ckpt", str(path), "--clip", "ViT-B-16"]
    elif case == "other_layers":
        path = run
        args = ["--ckpt", str(path), "--layers", "1", "2"]
    with pytest.raises(evaluate.CheckpointError) as e:
        evaluate.main(evaluate.parse_args(args + ["--out", str(tmp_path)]))
    assert str(path) in str(e.value)
    assert not (tmp_path / "metrics.json").exists()


def test_interrupted_save_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    path.write_bytes(open(run, "rb").read())
    def dies_midway(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        runfiles.save_checkpoint({"format_version": 1}, str(path))
    assert path.read_bytes() == open(run, "rb").read() and os.listdir(tmp_path) == ["run.pt"]


@pytest.mark.parametrize("flags", [["--bf16"], ["--precision", "fp32"]], ids=["bf16", "fp32"])
def test_both_precisions_train_with_finite_losses(tmp_path, flags):
    """auto picks one of the two on each machine (bf16 on a CPU with AMX): the other is run here explicitly."""
    path = train.main(train.parse_args(TINY + flags + ["--out", str(tmp_path)]))
    ckpt = torch.load(path, weights_only=True)
    bf16 = flags == ["--bf16"]
    assert ckpt["config"]["bf16"] == ckpt["config"]["frozen_bf16"] == bf16
    assert all(np.isfinite(v) for v in ckpt["stats"]["last"].values())
    assert all(v.dtype == torch.float32 for v in ckpt["state_dicts"]["mediclip"].values() if v.is_floating_point())
    m = evaluate.main(evaluate.parse_args(["--ckpt", path, "--out", str(tmp_path / "eval"), "--overlays", "0",
                                           "--bootstrap", "0", "--precision", "bf16" if bf16 else "fp32"]))
    assert 0 <= m["image"]["auroc"] <= 1


def test_cache_skips_the_encoders_and_changes_nothing(monkeypatch, tmp_path):
    plain = torch.load(train.main(train.parse_args(TINY + ["--out", str(tmp_path / "plain")])), weights_only=True)
    cache = ["--cache", str(tmp_path / "cache")]
    first = torch.load(train.main(train.parse_args(TINY + cache + ["--out", str(tmp_path / "a")])), weights_only=True)
    cached = lambda run: json.load(open(tmp_path / run / "timings.json"))["encodings_cached"]
    monkeypatch.setattr(encode, "load_medvae", lambda *a: (_ for _ in ()).throw(AssertionError("MedVAE loaded")))
    again = torch.load(train.main(train.parse_args(TINY + cache + ["--out", str(tmp_path / "b")])), weights_only=True)
    assert not cached("a") and cached("b")
    for ckpt in (first, again):                   # bit-identical to a run without the cache
        for name, sd in plain["state_dicts"].items():
            assert all(torch.equal(v, ckpt["state_dicts"][name][k]) for k, v in sd.items())
    # other views (another seed) are another key; an unreadable cache file is encoded again, not trusted
    (next((tmp_path / "cache").iterdir())).write_bytes(b"not a tensor file")
    monkeypatch.undo()
    train.main(train.parse_args(TINY + cache + ["--out", str(tmp_path / "c")]))
    assert not cached("c")
    train.main(train.parse_args(TINY + cache + ["--seed", "1", "--out", str(tmp_path / "d")]))
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_eta_depends_on_the_deviation_loss_alone(run, tmp_path):
    """eta_theta trains on the deviation loss alone, with the same random draws whatever the synthesis's region
    shape, low-pass or the detector's warm-up: its weights are the same bit for bit. realism.py can therefore
    measure other synthesis settings on one checkpoint's eta_theta, and a checkpoint kept for its eta_theta alone
    can skip most of the detector's steps (--eta-warmup)."""
    other = train.main(train.parse_args(TINY + ["--synth-mask", "lesions", "--eta-smooth", "1.5", "--eta-warmup", "11",
                                                "--out", str(tmp_path)]))
    a, b = (torch.load(p, weights_only=True)["state_dicts"]["eta"] for p in (run, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(other, weights_only=True)["config"]["synth_mask"] == "lesions"


def test_the_warm_up_skips_the_synthesis_it_does_not_use(tmp_path, monkeypatch):
    """During eta_theta's warm-up the synthesis draws are made (same random stream) but nothing is synthesised."""
    import deviation
    calls, real = [], deviation.synthesise_latent
    monkeypatch.setattr(deviation, "synthesise_latent", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = []
    for warmup in ("0", "4"):
        calls.clear()
        train.main(train.parse_args(TINY + ["--eta-warmup", warmup, "--out", str(tmp_path / warmup)]))
        counts.append(len(calls))
    assert counts[0] - counts[1] == 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_profile_script_follows_train(tmp_path, precision):
    """scripts/profile_train.py wraps train.py's parts (the text tower's constructor among them) in its own process:
    a change of their signatures must not break it."""
    import subprocess
    import sys
    argv = ["scripts/profile_train.py", "--split", "--", *TINY, "--precision", precision, "--out", str(tmp_path)]
    script = (f"import runpy, sys; sys.path.insert(0, 'tests'); import conftest; conftest.register_tiny_clip("
              f"{str(tmp_path)!r}); sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| **wall** |" in r.stdout and "| text tower + prompts |" in r.stdout
