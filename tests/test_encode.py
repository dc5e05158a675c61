"""Frozen encoders: shapes, and parity with the real open_clip and medvae packages."""
import copy
import socket
import time
import warnings

import pytest
import torch
import yaml

import encode
import fastclip
import weights
from conftest import TINY_CLIP, lightning_checkpoint, reorder_tol


def test_clip_tokens_match_forward_hooks(tiny_clip):
    layers = (2, 4)
    x = torch.rand(2, 3, 64, 64)
    ours = encode.encode_tokens(encode.CLIPTokens(tiny_clip, layers), x, tiny_clip)
    seen = {}
    blocks = tiny_clip.visual.transformer.resblocks
    hooks = [blocks[i - 1].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in layers]
    with torch.no_grad():
        tiny_clip.encode_image(encode.clip_normalise(x, tiny_clip))
    for h in hooks:
        h.remove()
    for i, t in zip(layers, ours):
        ref = seen[i].transpose(0, 1) if seen[i].shape[1] == 2 else seen[i]     # open_clip 2.x: (L, B, D)
        ref = ref[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
        assert t.shape == (2, 64, 4, 4)
        torch.testing.assert_close(t, ref)


def test_clip_tokens_stop_after_deepest_block(tiny_clip):
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in
             enumerate(tiny_clip.visual.transformer.resblocks, 1)]
    encode.encode_tokens(encode.CLIPTokens(tiny_clip, (1, 2)), torch.rand(1, 3, 64, 64), tiny_clip)
    for h in hooks:
        h.remove()
    assert calls == [1, 2]


def test_bf16_tokens_from_a_cast_folded_copy_leave_the_clip_as_loaded(tiny_clip):
    """CLIPTokens(..., torch.bfloat16): blocks copied with bf16 linear weights and QuickGELU folded into c_fc and
    c_proj (the same function: fp32 to rounding), tokens as close to fp32's as the plain bf16 path's; the CLIP's
    own weights and activation untouched."""
    block = tiny_clip.visual.transformer.resblocks[0]
    x = torch.randn(17, 2, 64)
    with torch.no_grad():      # the folded MLP rounds 1.702 h differently: attention (64) and MLP (256 + 64) sums
        ref = block(x)
        torch.testing.assert_close(fastclip.fold_quickgelu(copy.deepcopy(block))(x), ref,
                                   **reorder_tol(64 + 256 + 64, ref.abs().max()))
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    layers, images = (2, 4), torch.rand(3, 3, 64, 64)
    ref = encode.encode_tokens(encode.CLIPTokens(tiny_clip, layers), images, tiny_clip)
    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)
    plain = encode.encode_tokens(encode.CLIPTokens(tiny_clip, layers), images, tiny_clip, autocast=bf16)
    fast = encode.encode_tokens(encode.CLIPTokens(tiny_clip, layers, torch.bfloat16), images, tiny_clip, autocast=bf16)
    for r, p, f in zip(ref, plain, fast):
        assert (f - r).norm() / r.norm() < 2 * (p - r).norm() / r.norm() + 1e-3
    assert all(torch.equal(v, before[k]) for k, v in tiny_clip.state_dict().items())
    assert encode.clip_activation(tiny_clip) == "quickgelu"


def test_layers_out_of_range(tiny_clip):
    with pytest.raises(ValueError, match="1..4"):
        encode.CLIPTokens(tiny_clip, (2, 9))


def offline(monkeypatch, tmp_path):
    """No route to the hub, an empty HF cache and an empty ~/.cache/clip; HF_HUB_OFFLINE unset whatever the machine
    sets (the GPU check exports it)."""
    import huggingface_hub.constants as c
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "probe", lambda *a, **k: "no route to https://huggingface.co:443 (test)")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_offline_clip_fails_fast_with_ways_out(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    t = time.time()
    with pytest.raises(encode.WeightsUnavailable) as e:
        encode.load_clip("ViT-B-16", "openai")
    assert time.time() - t < 10
    msg = str(e.value)
    assert "timm/vit_base_patch16_clip_224.openai" in msg and "no route" in msg
    assert "--clip-weights" in msg and "--random-init" in msg and "--prefetch" in msg


def test_only_usable_clip_models_are_listed():
    names = encode.clip_names()
    assert "ViT-L-14" in names and "ViT-B-16-quickgelu" in names and "RN50" not in names
    with pytest.raises(ValueError, match="unsupported CLIP model 'RN50'"):
        encode.load_clip("RN50", random_init=True)


# -----------------------------------------------------------------------------
# CLIP weights files: every published format, OpenAI's detected (QuickGELU), nothing executed

def traced_openai_archive(model, path):
    """A TorchScript archive shaped like OpenAI's CLIP .pt files: the traced model with their extra buffers."""
    m = copy.deepcopy(model)
    for k, v in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        m.__dict__.pop(k, None)                     # open_clip keeps the last two as plain ints
        m.register_buffer(k, torch.tensor(v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the tracer's notes on Python control flow
        traced = torch.jit.trace(m, (torch.rand(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    torch.jit.save(traced, str(path))


def assert_same_weights(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_clip_weights_files_in_every_format(tmp_path, tiny_clip, monkeypatch, capsys):
    from safetensors.torch import save_file
    sd = tiny_clip.state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip_model.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    torch.save({**sd, "input_resolution": torch.tensor(64)}, tmp_path / "openai_state_dict.pt")
    traced_openai_archive(tiny_clip, tmp_path / "ViT-tiny-openai.pt")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("TorchScript must not be loaded"))
    expect = {"open_clip_pytorch_model.bin": "gelu", "open_clip_model.safetensors": "gelu", "ddp.pt": "gelu",
              "openai_state_dict.pt": "quickgelu", "ViT-tiny-openai.pt": "quickgelu"}
    for name, act in expect.items():
        loaded = encode.load_clip(TINY_CLIP, weights=str(tmp_path / name), random_init=True)   # the file wins
        assert_same_weights(tiny_clip, loaded)
        assert encode.clip_activation(loaded) == act, name
        assert not any(p.requires_grad for p in loaded.parameters())
    out = capsys.readouterr().out
    assert "OpenAI's CLIP weights (torchscript): built ViT-tiny-test with QuickGELU" in out
    assert "does not say whether it is OpenAI's CLIP (QuickGELU)" in out      # the plain state dicts


def test_weights_from_a_file_fill_a_model_built_empty(tmp_path, tiny_clip, monkeypatch):
    """clip_from_file builds on the meta device and assigns the file's tensors (no random init, no second copy):
    the same weights, causal mask (the one tensor no file holds) and outputs as building for real and loading;
    an fp16 file gives fp32 weights; a buffer it cannot rebuild sends it the slow way."""
    torch.save(tiny_clip.state_dict(), tmp_path / "w.bin")
    torch.save({k: v.half() for k, v in tiny_clip.state_dict().items()}, tmp_path / "half.bin")
    x, text = torch.rand(2, 3, 64, 64), torch.randint(0, 49408, (3, 77))
    loaded = encode.clip_from_file(TINY_CLIP, str(tmp_path / "w.bin"), quickgelu=True)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert torch.equal(loaded.attn_mask, tiny_clip.attn_mask)
    assert_same_weights(tiny_clip, loaded)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), tiny_clip.encode_image(x))
        assert torch.equal(loaded.encode_text(text), tiny_clip.encode_text(text))
    half = encode.clip_from_file(TINY_CLIP, str(tmp_path / "half.bin"), quickgelu=True)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    monkeypatch.setattr(encode, "restore_causal_masks", lambda model: False)   # as if open_clip made another buffer
    slow = encode.clip_from_file(TINY_CLIP, str(tmp_path / "w.bin"), quickgelu=True)
    assert not any(t.is_meta for t in (*slow.parameters(), *slow.buffers()))
    assert_same_weights(tiny_clip, slow)


def test_a_hub_snapshot_says_it_is_openai(tmp_path, tiny_clip, capsys):
    snap = tmp_path / "models--timm--x" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    torch.save(tiny_clip.state_dict(), snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}}')
    loaded = encode.load_clip(TINY_CLIP, weights=str(snap / "open_clip_pytorch_model.bin"))
    assert encode.clip_activation(loaded) == "quickgelu"
    torch.save(tiny_clip.state_dict(), tmp_path / "plain.bin")             # says nothing of where it is from
    with pytest.raises(encode.WeightsUnavailable, match="does not fit"):
        encode.clip_from_file("ViT-B-16", str(tmp_path / "plain.bin"))
    assert "If it holds OpenAI's weights, pass --clip ViT-B-16-quickgelu" in capsys.readouterr().out


def test_legacy_openai_cache_file_is_used_offline(tmp_path, tiny_clip, monkeypatch):
    """A ~/.cache/clip/<name>.pt that open_clip <= 2.28 downloaded is read (its tensors only) without network."""
    from open_clip import pretrained
    url = "https://openaipublic.azureedge.net/clip/models/0000/ViT-tiny-test.pt"
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP, {"openai": pretrained._pcfg(url)})
    monkeypatch.setitem(weights.OPENAI_HUB, TINY_CLIP, "timm/none.openai")
    offline(monkeypatch, tmp_path)
    (tmp_path / ".cache" / "clip").mkdir(parents=True)
    traced_openai_archive(tiny_clip, tmp_path / ".cache" / "clip" / "ViT-tiny-test.pt")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network access attempted"))
    loaded = encode.load_clip(TINY_CLIP, "openai")
    assert_same_weights(tiny_clip, loaded)
    assert encode.clip_activation(loaded) == "quickgelu"


def test_clip_weights_for_another_architecture(tmp_path):
    path = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(encode.WeightsUnavailable, match="does not fit"):
        encode.load_clip(TINY_CLIP, weights=str(path))


def test_random_init_is_the_same_every_time():
    a, b = encode.load_clip(TINY_CLIP, random_init=True), encode.load_clip(TINY_CLIP, random_init=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert encode.clip_activation(a) == "quickgelu"        # the default tag is openai: its architecture


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="ViT-B-16"):
        encode.load_clip("ViT-X-99", random_init=True)
    with pytest.raises(ValueError, match="medvae_4_1_2d"):
        encode.load_medvae("medvae_9_9_2d", random_init=True)


# -----------------------------------------------------------------------------
# MedVAE

def write_medvae_files(folder):
    """A random tiny MedVAE written as the hub's files would be: a yaml config and a {'state_dict': ...} ckpt."""
    model = encode.load_medvae("medvae_tiny_2d", random_init=True)
    cfg, ckpt = folder / "medvae.yaml", folder / "vae.ckpt"
    cfg.write_text(yaml.safe_dump(dict(ddconfig=encode.medvae_ddconfig("medvae_tiny_2d"), embed_dim=1)))
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return model, str(cfg), str(ckpt)


def test_medvae_latents_match_the_package(tmp_path, monkeypatch):
    import medvae
    import medvae.utils.factory as factory
    _, cfg, ckpt = write_medvae_files(tmp_path)
    files = {"config": cfg, "ckpt": ckpt}
    # the package's real loading path (MVAE -> create_model_and_transform -> build_model), hub download aside
    monkeypatch.setattr(factory, "download_model_weights",
                        lambda p: files["config"] if p.endswith(".yaml") else files["ckpt"])
    ref_model = medvae.MVAE("medvae_4_1_2d", "xray").model.eval()
    ours = encode.load_medvae("medvae_tiny_2d", weights=ckpt)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = ref_model.encode(encode.medvae_normalise(x, 1)).mode()
    z = encode.encode_latents(ours, x)
    assert z.shape == (2, 1, 16, 16) and z.is_contiguous()
    conv = next(m for m in ours.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()  # freeze_vae
    torch.testing.assert_close(z, ref)                                                    # the package's NCHW model
    # and our hub path builds through the package too
    monkeypatch.setattr(weights, "hub_file", lambda repo, f, flag: files["config"] if f.endswith(".yaml") else ckpt)
    torch.testing.assert_close(encode.encode_latents(encode.load_medvae("medvae_4_1_2d"), x), ref)


def test_medvae_normalisation_matches_the_package_transform(tmp_path):
    from PIL import Image
    from medvae.utils.loaders import load_2d
    import data
    arr = (torch.rand(40, 48) * 200 + 20).to(torch.uint8).numpy()
    Image.fromarray(arr).convert("RGB").save(tmp_path / "x.png")
    ref = load_2d(str(tmp_path / "x.png"), merge_channels=True)              # (1, H, W)
    img = torch.from_numpy(data.read_image({"path": str(tmp_path / "x.png"), "image": None}))
    ours = encode.medvae_normalise(img.permute(2, 0, 1)[None], 1)[0]
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)   # min-max of values in [-1, 1]: ~80 eps


def test_offline_medvae_fails_fast(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    t = time.time()
    with pytest.raises(encode.WeightsUnavailable, match="--vae-weights"):
        encode.load_medvae("medvae_4_1_2d")
    assert time.time() - t < 10


def test_medvae_lightning_checkpoint_same_by_file_and_by_hub(tmp_path, monkeypatch, capsys):
    """LDM's loss.* keys are named and ignored, Lightning's pickled extras are skipped without running them
    (medvae's own loader refuses this file under torch's weights_only default), the weights are the same."""
    from medvae.models import AutoencoderKL_2D
    model, cfg, _ = write_medvae_files(tmp_path)
    lightning_checkpoint(model.state_dict(), tmp_path / "lightning.ckpt")
    ckpt = str(tmp_path / "lightning.ckpt")
    with pytest.raises(Exception, match="weights_only"):
        AutoencoderKL_2D(ddconfig=encode.medvae_ddconfig("medvae_tiny_2d"), embed_dim=1, ckpt_path=ckpt)
    by_file = encode.load_medvae("medvae_tiny_2d", weights=ckpt, random_init=True)   # the file wins
    monkeypatch.setattr(weights, "hub_file", lambda repo, f, flag: cfg if f.endswith(".yaml") else ckpt)
    by_hub = encode.load_medvae("medvae_4_1_2d")
    for a in (by_file, by_hub):
        for k, v in model.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
    out = capsys.readouterr().out
    assert "ignored loss.* (2)" in out and "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in out
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.conv_in.weight"}
    torch.save({"state_dict": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(encode.WeightsUnavailable, match="1 missing keys e.g. .'encoder.conv_in.weight'"):
        encode.load_medvae("medvae_tiny_2d", weights=str(tmp_path / "missing.ckpt"))
