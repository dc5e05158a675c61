"""The GPU path: train.py and evaluate.py end to end on CUDA, the bf16 paths there, and checkpoints moving between
CUDA and the CPU with equal scores. Skipped where no CUDA device is (CI); run on a GPU machine (.device/check.sh)."""
import csv
import os

import numpy as np
import pytest
import torch

import evaluate
import train
from test_train_eval import TINY

# device_count, not is_available: conftest.cpu_only makes is_available say False for the CPU tests
pytestmark = pytest.mark.skipif(torch.cuda.device_count() == 0, reason="no CUDA device here")


@pytest.fixture(scope="module", autouse=True)
def gpu_back():
    """The other tests run on the CPU even on a GPU machine (conftest.cpu_only); these take the GPU back."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        yield


def train_on(device, out, extra=()):
    return train.main(train.parse_args(TINY + ["--device", device, "--out", str(out), *extra]))


def scores_of(ckpt, device, out, precision="fp32"):
    evaluate.main(evaluate.parse_args(["--ckpt", ckpt, "--device", device, "--out", str(out), "--overlays", "0",
                                       "--precision", precision, "--bootstrap", "0"]))
    with open(os.path.join(out, "scores.csv")) as f:
        return np.array([float(r["score"]) for r in csv.DictReader(f)])


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    return train_on("cuda", tmp_path_factory.mktemp("cuda"))


def test_train_and_evaluate_on_cuda(cuda_run, tmp_path):
    ckpt = torch.load(cuda_run, weights_only=True)      # plain types, every tensor back on the CPU
    assert all(t.device.type == "cpu" for sd in ckpt["state_dicts"].values() for t in sd.values())
    assert all(np.isfinite(v) for v in ckpt["stats"]["last"].values() if isinstance(v, float))
    s = scores_of(cuda_run, "cuda", tmp_path)
    assert len(s) and np.isfinite(s).all()


def test_a_checkpoint_made_on_cuda_scores_the_same_on_the_cpu(cuda_run, tmp_path):
    np.testing.assert_allclose(scores_of(cuda_run, "cpu", tmp_path / "c"), scores_of(cuda_run, "cuda", tmp_path / "g"),
                               atol=1e-3)   # cuBLAS/cuDNN sum in other orders (TF32 off): scores in [0, 1]


def test_a_checkpoint_made_on_the_cpu_scores_the_same_on_cuda(tmp_path):
    path = train_on("cpu", tmp_path / "run", ["--precision", "fp32"])
    np.testing.assert_allclose(scores_of(path, "cuda", tmp_path / "g"), scores_of(path, "cpu", tmp_path / "c"),
                               atol=1e-3)


def test_bf16_on_cuda_trains_and_agrees_with_fp32(cuda_run, tmp_path):
    path = train_on("cuda", tmp_path / "bf16", ["--precision", "bf16"])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["bf16"] and ckpt["config"]["frozen_bf16"]
    assert all(np.isfinite(v) for v in ckpt["stats"]["last"].values() if isinstance(v, float))
    fp32, bf16 = scores_of(cuda_run, "cuda", tmp_path / "a", "fp32"), scores_of(cuda_run, "cuda", tmp_path / "b", "bf16")
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)   # the frozen forward in bf16 (eps 7.8e-3) against fp32, same checkpoint
