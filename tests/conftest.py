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

# A ViT with open_clip's real structure at toy size: 64 px, 16 px patches (4x4 tokens), 4 blocks.
TINY_CLIP = "ViT-tiny-test"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


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
    torch.set_num_threads(2)
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
