"""Bad input fails with one clear line; nothing touches the network with local or random weights."""
import csv
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import calibration
import data
import evaluate
import report
import mediclip
import train
from conftest import ROOT, TINY_CLIP
from test_train_eval import TINY


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, needle", [
    (["train.py", "--data", "brainmri", "--data-root", "/nonexistent/root"], "/nonexistent/root"),
    (["train.py", "--data", "synthetic", "--shots", "0", "--random-init"], "--shots must be >= 1, got 0"),
    (["train.py", "--data", "synthetic", "--random-init", "--device", "cuda"] if not torch.cuda.is_available() else
     ["train.py", "--data", "synthetic", "--random-init", "--device", "nonsense"], "--device"),
    (["synthesise.py", "--ckpt", "tests", "--device", "cpu"], "tests: a folder, not a checkpoint file"),
    (["evaluate.py", "--ckpt", "tests"], "tests: a folder, not a checkpoint file"),
    (["evaluate.py", "--ckpt", "/nonexistent/run.pt"], "/nonexistent/run.pt"),
    (["train.py", "--data", "synthetic", "--random-init", "--steps", "0"], "--steps must be >= 1"),
    (["train.py", "--data", "synthetic", "--random-init", "--steps", "20"], "--steps 20 <= --eta-warmup 50"),
    (["train.py", "--data", "synthetic", "--random-init", "--out", "/proc/run"], "--out /proc/run: cannot write"),
    (["train.py", "--data", "synthetic", "--random-init", "--clip", "RN50"], "unsupported CLIP model 'RN50'"),
    (["evaluate.py", "--zero-shot", "--random-init", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["evaluate.py", "--zero-shot", "--random-init", "--out", "README.md/x"], "README.md is a file, not a folder"),
])
def test_cli_errors_are_one_line_without_traceback(argv, needle):
    r = run_cli(*argv)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last


def test_nan_loss_stops_with_step_and_term(monkeypatch, tmp_path):
    monkeypatch.setattr(mediclip, "dice_loss", lambda p, m: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match=r"step 5: loss term dice"):
        train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    assert not (tmp_path / "run.pt").exists()


def test_random_init_never_touches_the_network(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    path = train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    assert evaluate.main(evaluate.parse_args(["--ckpt", path, "--overlays", "0"]))["image"]["auroc"] >= 0


def test_evaluate_refuses_another_activation(tmp_path, tiny_clip):
    """Trained on OpenAI-style weights (QuickGELU); weights that build GELU give other tokens: refused."""
    path = train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    assert torch.load(path, weights_only=True)["config"]["clip_act"] == "quickgelu"
    torch.save(tiny_clip.state_dict(), tmp_path / "plain.bin")
    with pytest.raises(evaluate.CheckpointError, match="with quickgelu, but the weights given here build it with gelu"):
        evaluate.main(evaluate.parse_args(["--ckpt", path, "--clip-weights", str(tmp_path / "plain.bin")]))


def test_ctrl_c_says_the_step_in_one_line(tmp_path):
    import signal
    import time
    argv = ["train.py"] + TINY[:-6] + ["--steps", "100000", "--eta-warmup", "0", "--log-every", "1", "--out",
                                       str(tmp_path)]
    script = (f"import runpy, sys; sys.path.insert(0, 'tests'); import conftest; conftest.register_tiny_clip("
              f"{str(tmp_path)!r}); sys.argv = {argv!r}; runpy.run_path('train.py', run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log, t = tmp_path / "log.csv", time.time()
    while p.poll() is None and not (log.exists() and len(log.read_text().splitlines()) > 2) and time.time() - t < 120:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "Traceback" not in err
    assert re.search(r"interrupted at step \d+ of 100000; no checkpoint was saved", err.strip().splitlines()[-1])
    assert not (tmp_path / "run.pt").exists()


def test_own_images_score_what_can_be_read_and_list_the_rest(tmp_path, capsys):
    d = tmp_path / "scans"
    d.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 60 * (i + 1)).astype(np.uint8)).save(d / f"ok{i}.png")
    Image.new("L", (1, 1)).save(d / "tiny.png")
    (d / "text.png").write_text("not an image")
    (d / "empty.jpg").write_bytes(b"")
    (d / "study.dcm").write_bytes(b"DICM")
    evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images", str(d),
                                       "--out", str(tmp_path / "out")]))
    rows = open(tmp_path / "out" / "scores.csv").read().splitlines()
    assert len(rows) == 1 + 3
    skipped = open(tmp_path / "out" / "skipped.csv").read()
    for name in ("tiny.png", "text.png", "empty.jpg", "study.dcm"):
        assert name in skipped
    out = capsys.readouterr().out
    assert "skipped 4, listed in" in out and "WARNING: random backbone weights" in out
    overlays = sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("overlay_"))
    assert overlays and not any(f.endswith(".png.png") for f in overlays)       # overlay_00_ok2.png
    panel = np.asarray(Image.open(tmp_path / "out" / overlays[0]))[30:, 650:950]  # no mask: said, not drawn black
    assert (panel == 96).mean() > 0.9
    for f in ("ok0.png", "ok1.png", "ok2.png"):
        (d / f).unlink()
    with pytest.raises(data.DataError, match="no images here that could be read"):
        evaluate.main(evaluate.parse_args(["--zero-shot", "--random-init", "--clip", TINY_CLIP, "--images", str(d)]))


def test_checkpoint_bytes_depend_on_the_inputs_only(tmp_path):
    """The same command twice: the same sha256 (timings go to timings.json); the data root is stored absolute."""
    a = train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    h = evaluate.sha256(a)
    assert train.main(train.parse_args(TINY + ["--out", str(tmp_path)])) == a and evaluate.sha256(a) == h
    assert os.path.isabs(torch.load(a, weights_only=True)["config"]["data_root"])
    timings = json.load(open(tmp_path / "timings.json"))
    assert timings["train_s"] > 0 and 0 < timings["det_step_s_median"] <= timings["train_s"]


def test_reports_say_what_a_reader_must_know_first(tmp_path, capsys):
    """An untrained detector (0 detection steps), an inverted calibration set, a cross-dataset test: in
    metrics.json and on the console, with the probability still non-decreasing in the score."""
    path = train.main(train.parse_args(TINY + ["--out", str(tmp_path)]))
    ckpt = torch.load(path, weights_only=True)
    cal = ckpt["calibration"]
    cal["normal"], cal["anomalous"] = cal["anomalous"] + 0.5, cal["normal"] - 0.5   # anomalies below normals
    ckpt["stats"]["detector_steps"] = 0
    torch.save(ckpt, tmp_path / "bad.pt")
    m = evaluate.main(evaluate.parse_args(["--ckpt", str(tmp_path / "bad.pt"), "--overlays", "0", "--bootstrap", "0",
                                           "--out", str(tmp_path / "e")]))
    text = " | ".join(m["warnings"])
    assert "never trained" in text and "inverted calibration set" in text and "random backbone" in text
    assert m["conditions"]["detector_steps"] == [0] and m["conditions"]["eta_warmup"] == 4
    out = capsys.readouterr().out
    assert "WARNING: a checkpoint's detector never trained" in out and "WARNING: calibration: inverted" in out
    rows = list(csv.DictReader(open(tmp_path / "e" / "scores.csv")))
    rows.sort(key=lambda r: float(r["score"]))
    assert all(float(a["probability"]) <= float(b["probability"]) for a, b in zip(rows, rows[1:]))
    # the few-shot calibration of a synthetic checkpoint, tested on busi-like data: said
    m = evaluate.main(evaluate.parse_args(["--ckpt", path, "--data", "synthetic", "--overlays", "0", "--bootstrap",
                                           "0", "--out", str(tmp_path / "x")]))
    assert not any("calibration and thresholds fitted on" in w for w in m["warnings"])
    m["conditions"]["train_data"] = "busi"
    assert any("fitted on busi" in w for w in report.report_warnings(m, [ckpt], "synthetic"))


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "(default: 300)" in capsys.readouterr().out


def test_device_errors_say_what_is_here():
    import runfiles
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda: .*; devices here: auto, cpu"):
            runfiles.pick_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        runfiles.pick_device("gpu0")
    assert runfiles.pick_device("cpu").type == "cpu"


def test_a_folder_holding_run_pt_is_suggested(tmp_path):
    import runfiles
    (tmp_path / "run.pt").write_bytes(b"")
    with pytest.raises(runfiles.CheckpointError, match=f"did you mean {tmp_path}/run.pt"):
        runfiles.load_checkpoint(str(tmp_path))


def test_missed_targets_and_a_calibration_that_does_not_transfer_are_said():
    ops = {"p>=0.5": dict(sensitivity=0.2, specificity=0.9, sensitivity_on_fit_data=0.9),
           "sensitivity>=0.95": dict(sensitivity=0.0, specificity=1.0, sensitivity_on_fit_data=0.97,
                                     target_sensitivity=0.95)}
    w = calibration.transfer_warnings(dict(operating_points=ops, calibration=dict(ece=0.45, ece_on_fit_data=0.06)))
    assert len(w) == 2
    assert "sensitivity>=0.95: sensitivity 0.000 on the test images against 0.970" in w[0] and "missed" in w[0]
    assert "ECE 0.450 on the test images against 0.060" in w[1]
    ops["sensitivity>=0.95"]["sensitivity"] = 0.93
    assert calibration.transfer_warnings(dict(operating_points=ops,
                                              calibration=dict(ece=0.08, ece_on_fit_data=0.06))) == []


def test_overlays_share_one_scale_keep_their_aspect_and_say_what_they_show(tmp_path):
    import exports
    image = np.full((300, 600, 3), 0.5, np.float32)                              # an 800x600-like, wide image
    low, high = np.full((8, 8), 0.1, np.float32), np.full((8, 8), 0.9, np.float32)
    for name, amap in (("low", low), ("high", high)):
        exports.write_overlay(str(tmp_path / f"{name}.png"), image, amap, None, (0.0, 1.0), "caption")
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("low", "high"))
    assert a.shape == (160 + 36, 3 * 320 + 8 + 16 + 64, 3)                      # 2:1, not squashed to a square
    heat = lambda x: x[30:, 320:640]
    assert heat(b).sum() > heat(a).sum() + 1000                                   # one scale: low stays cool
    assert exports.overlay_caption(0.4, 0.8, 0) == ("score 0.4000 | P(anomalous) 0.800 | call: anomalous "
                                                    "(p >= 0.5) | truth: normal")
    assert "uncalibrated" in exports.overlay_caption(0.4, None, -1) and "truth: unknown" in \
        exports.overlay_caption(0.4, None, -1)
