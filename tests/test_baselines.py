"""Pixel-space baselines in train.py, the bank encoded once, and the ablation protocol on tiny models."""
import json
import os

import pytest
import torch

import encode
import evaluate
import train
from baselines import ablation
from test_train_eval import TINY


def test_pixel_modes_encode_the_bank_once(monkeypatch, tmp_path):
    seen = []
    forward = encode.CLIPTokens.forward
    monkeypatch.setattr(encode.CLIPTokens, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    for mode in ("mediclip", "pixel-noise", "mix"):
        seen.clear()
        path = train.main(train.parse_args(TINY + ["--synth", mode, "--bank", "6", "--out", str(tmp_path / mode)]))
        assert sum(seen) == 4 + 6               # the views, then the bank; nothing inside the loop
        assert torch.load(path, weights_only=True)["config"]["bank_size"] == 6


def test_ablation_table_and_resume(monkeypatch, tmp_path):
    argv = ["--datasets", "synthetic", "--shots", "1", "--seeds", "0", "1", "--modes", "deviation", "pixel-noise",
            "--out", str(tmp_path), "--"] + TINY[TINY.index("--random-init"):] + ["--bank", "4"]
    runs = ablation.main(ablation.parse_args(argv))
    assert len(runs) == 4 and all(0 <= r["image_auroc"] <= 1 for r in runs)
    table = open(tmp_path / "table.md").read()
    assert "synthetic -> synthetic" in table and "±" in table and "(n=2)" in table
    saved = json.load(open(tmp_path / "runs.json"))
    assert saved["runs"][0]["metrics"]["conditions"]["synth"] == "deviation"
    # a second call finds every run done and trains nothing
    monkeypatch.setattr(train, "main", lambda args: (_ for _ in ()).throw(AssertionError("retrained")))
    assert len(ablation.main(ablation.parse_args(argv))) == 4
    # --report-only tabulates what is finished and runs nothing for the rest
    report = ["--datasets", "synthetic", "--shots", "1", "--seeds", "0", "1", "2", "--modes", "deviation",
              "pixel-noise", "--out", str(tmp_path), "--report-only"]
    assert len(ablation.main(ablation.parse_args(report))) == 4
    assert os.path.isdir(tmp_path / "synthetic" / "k1" / "pixel-noise" / "s1")
    assert json.load(open(tmp_path / "runs.json"))["train_args"] == argv[argv.index("--") + 1:]   # kept, not []
    # the protocol with other train.py settings into the same --out: refused, never taken for its own runs
    other = argv[:argv.index("--") + 1] + TINY[TINY.index("--random-init"):] + ["--bank", "4", "--C", "2", "4"]
    with pytest.raises(SystemExit, match=r"k1/deviation/s0: made with other train.py settings than this call "
                                         r"\(--C \[0.5, 1.5\] then, \[2.0, 4.0\] now\)"):
        ablation.main(ablation.parse_args(other))
    assert ablation.main(ablation.parse_args(other[:other.index("--")] + ["--report-only"] + other[other.index("--"):])) == []
    assert len(json.load(open(tmp_path / "runs.json"))["other_settings"]) == 4
    # that report changed nothing the next one reads: a plain --report-only shows the runs again
    assert json.load(open(tmp_path / "runs.json"))["train_args"] == argv[argv.index("--") + 1:]
    assert len(ablation.main(ablation.parse_args(report))) == 4
    # the same dataset name under another --data-root with other files: refused, not reused as a cell
    json.dump(dict(data_root="/elsewhere", identity="0123456789abcdef"),
              open(tmp_path / "synthetic" / "k1" / "deviation" / "s0" / "data.json", "w"))
    with pytest.raises(SystemExit, match=r"--data /elsewhere \(0123456789abcdef\) then"):
        ablation.main(ablation.parse_args(argv))


def test_ablation_evaluates_a_block_in_one_pass_as_each_alone(monkeypatch, tmp_path):
    argv = ["--datasets", "synthetic", "--shots", "1", "--seeds", "0", "--modes", "deviation", "latent-noise",
            "--out", str(tmp_path), "--"] + TINY[TINY.index("--random-init"):]
    ablation.main(ablation.parse_args(argv))
    folders = [tmp_path / "synthetic" / "k1" / mode / "s0" for mode in ("deviation", "latent-noise")]
    together = [json.load(open(f / "eval-synthetic" / "metrics.json")) for f in folders]
    for f in folders:
        os.remove(f / "eval-synthetic" / "metrics.json")        # checkpoints kept: only the evaluation runs again
    seen = []
    forward = encode.CLIPTokens.forward
    monkeypatch.setattr(encode.CLIPTokens, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    ablation.main(ablation.parse_args(argv))
    assert sum(seen) == together[0]["reported_on"]["images"]      # one forward of the test set for both runs
    for f, m in zip(folders, together):
        alone = evaluate.main(evaluate.parse_args(["--ckpt", str(f / "run.pt"), "--out", str(tmp_path / "alone"),
                                                   "--overwrite", "--overlays", "0", "--bootstrap", "0"]))
        assert json.loads(json.dumps(alone)) == m == json.load(open(f / "eval-synthetic" / "metrics.json"))
