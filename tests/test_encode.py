"""Frozen encoders: shapes, and parity with the real open_clip and medvae packages."""
import time

import open_clip
import pytest
import torch
import yaml

import encode
import mediclip
from conftest import TINY_CLIP


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


def test_layers_out_of_range(tiny_clip):
    with pytest.raises(ValueError, match="1..4"):
        encode.CLIPTokens(tiny_clip, (2, 9))


def test_prompt_text_tower_reproduces_encode_text(tiny_clip):
    """Contexts initialised from a phrase's token embeddings give open_clip's own encode_text of it."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=1)
    x, eot = det.prompts()
    ours = encode.TextTower(tiny_clip)(x, eot)
    ids, _ = mediclip.tokenize_prompts()
    with torch.no_grad():
        ref = tiny_clip.encode_text(ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_clip_weights_file_loads_bit_for_bit(tmp_path, tiny_clip):
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    loaded = encode.load_clip(TINY_CLIP, weights=str(path))
    for (k, a), b in zip(tiny_clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in loaded.parameters())


def test_clip_weights_for_another_architecture(tmp_path, tiny_clip):
    path = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(encode.WeightsUnavailable, match="does not fit"):
        encode.load_clip(TINY_CLIP, weights=str(path))


def test_random_init_is_the_same_every_time():
    a, b = encode.load_clip(TINY_CLIP, random_init=True), encode.load_clip(TINY_CLIP, random_init=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_offline_clip_fails_fast_with_ways_out(monkeypatch, tmp_path):
    monkeypatch.setattr(encode, "check_online", lambda *a, **k: False)
    monkeypatch.setenv("HOME", str(tmp_path))       # an empty ~/.cache/clip
    t = time.time()
    with pytest.raises(encode.WeightsUnavailable) as e:
        encode.load_clip("ViT-B-16", "openai")
    assert time.time() - t < 10
    assert "--clip-weights" in str(e.value) and "--random-init" in str(e.value)


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
    assert z.shape == (2, 1, 16, 16)
    torch.testing.assert_close(z, ref)
    # and our hub path builds through the package too
    monkeypatch.setattr(encode, "hub_file", lambda repo, f, flag: files["config"] if f.endswith(".yaml") else ckpt)
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
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_offline_medvae_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(encode, "check_online", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.time()
    with pytest.raises(encode.WeightsUnavailable, match="--vae-weights"):
        encode.load_medvae("medvae_4_1_2d")
    assert time.time() - t < 10
