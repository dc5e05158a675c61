"""Bad input fails with one clear line; nothing touches the network with local or random weights."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import evaluate
import mediclip
import train
from conftest import ROOT, TINY_CLIP
from test_train_eval import TINY


def run_cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, needle", [
    (["train.py", "--data", "brainmri", "--data-root", "/nonexistent/root"], "/nonexistent/root"),
    (["train.py", "--data", "synthetic", "--shots", "0", "--random-init"], "shots"),
    (["evaluate.py", "--ckpt", "/nonexistent/run.pt"], "/nonexistent/run.pt"),
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
