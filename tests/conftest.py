"""Shared test fixtures: tiny random models that make every test run on a CPU in seconds."""
import argparse
import json
import os
import pathlib
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
# --precision auto without timing anything: runs compared bit for bit must not depend on which of fp32 and bf16
# this machine ran faster a moment ago (tests/test_precision.py tests the measuring itself, with a fake timer)
os.environ.setdefault("MEDAD_PRECISION_AUTO", "fp32")

# A ViT with open_clip's real structure at toy size: 64 px, 16 px patches (4x4 tokens), 4 blocks.
TINY_CLIP = "ViT-tiny-test"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# Tolerances for two fp32 computations of one function that sum in other orders (another memory layout, a fused
# kernel, another CPU's kernels: AMX, AVX-512, AVX2). A sum of n terms computed in any order is within about n * eps
# of the exact sum, relative to the sum of the terms' magnitudes (Higham, Accuracy and Stability of Numerical
# Algorithms, 2002, eq. 4.4); `scale` stands for that magnitude (the output's largest), and for a chain of layers n
# is the reductions' lengths added up along it. A worst-case bound: the differences measured are far smaller (the
# U-Net test: 1.7e-6 on an AVX-512 EPYC against a bound of 7e-4), and what the tests look for (a wrong layout, a
# dropped term, a mis-scaled weight) is of the order of `scale` itself. Fitted to no CPU.
EPS32 = torch.finfo(torch.float32).eps


def reorder_tol(n, scale=1.0):
    """assert_close's tolerances for fp32 results that sum n terms per output, in another order (above)."""
    return dict(atol=n * EPS32 * float(scale), rtol=0)


def register_tiny_clip(folder):
    """Its config written whole (a temporary file, then os.replace): worker processes started together register
    it in the same folder, and none may read another's half-written file (test_shards failed so, once)."""
    import tempfile
    import open_clip
    path = os.path.join(folder, f"{TINY_CLIP}.json")
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(TINY_CLIP_CFG, f)
    os.replace(f.name, path)
    open_clip.add_model_config(path)


@pytest.fixture(scope="session", autouse=True)
def tiny_clip_config(tmp_path_factory):
    register_tiny_clip(str(tmp_path_factory.mktemp("clip_cfg")))
    # the cores shared among pytest-xdist's workers (-n 2 on CI's 2 cores: one thread each, no oversubscription)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    return TINY_CLIP


@pytest.fixture(scope="session", autouse=True)
def cpu_only():
    """On a GPU machine the tests still run on the CPU, as they do in CI: --device auto would pick CUDA, whose
    kernels are not bit-reproducible (several tests compare runs bit for bit) and whose bf16 default is not what the
    CPU tolerances were set for. tests/test_cuda.py takes the GPU back and asks for it by name."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_clip():
    import encode
    return encode.load_clip(TINY_CLIP, random_init=True)


def lightning_checkpoint(state_dict, path):
    """What an LDM / Lightning checkpoint holds besides the weights: the training loss's modules (loss.*),
    hyper-parameters, a path, and a callback keyed by a class of a package that is not installed here."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    mods = {n: types.ModuleType(n) for n in names}
    mod = mods[names[-1]]
    mod.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod.__name__})
    sys.modules.update(mods)
    try:
        torch.save({"state_dict": {**state_dict, "loss.logvar": torch.zeros(()),
                                   "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)},
                    "epoch": 3, "global_step": 1000, "hyper_parameters": argparse.Namespace(lr=4.5e-6),
                    "callbacks": {mod.ModelCheckpoint: {"best_model_path": pathlib.PurePosixPath("/ckpt/last.ckpt")}}},
                   path)
    finally:
        for n in names:
            del sys.modules[n]
