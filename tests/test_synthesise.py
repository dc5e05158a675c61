"""Seeing the synthesis: synthesise.py from a checkpoint, the statistics' definitions, and TAEF2, the one real
latent space that runs offline here (its weights are in ../shared/weights; those tests skip without them)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import deviation
import encode
import synthesise
import train
from conftest import SHARED_DATA, TINY_CLIP
from test_train_eval import TINY

SHARED_WEIGHTS = os.path.join(os.path.dirname(SHARED_DATA), "weights")
needs_taef2 = pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_WEIGHTS, "taef2_encoder.pth")),
                                 reason="../shared/weights (TAEF2) is not here")
needs_data = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not here")


def test_train_saves_the_synthesis_figure_and_statistics(tmp_path):
    train.main(train.parse_args(TINY + ["--out", str(tmp_path), "--save-synthesis", "3"]))
    img = Image.open(tmp_path / "synthesis.png")
    assert img.width == 6 * 160 and img.height == 18 + 3 * 160                 # 3 rows of 6 panels
    s = json.load(open(tmp_path / "synthesis.json"))
    assert s["n"] == 3 and s["synth"] == "deviation" and s["decoder_reach_px"] >= 1
    for kind in ("learned", "control"):
        assert 0 <= s[kind]["locality"]["mean"] <= s[kind]["locality_dilated"]["mean"] <= 1
        assert s[kind]["size"]["mean"] > 0 and np.isfinite(s[kind]["spectrum_slope"]["mean"])
    assert "shrink_corr" in s["learned"] and "shrink_corr" not in s["control"]
    assert any("random medvae_tiny_2d" in w for w in s["warnings"])


def test_statistics_summarise_the_images_where_they_are_defined():
    """token_change_in is NaN for an image whose mask covers no token cell by half: the summary skips it, says over
    how many images it ran, and does not warn (numpy's nanstd with ddof 1 on one value did)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = synthesise.summarise({"a": torch.tensor([float("nan"), 2.0]), "b": torch.tensor([1.0, 3.0, float("nan")]),
                                  "c": torch.tensor([float("nan")])})
    assert s["a"] == dict(mean=2.0, std=0.0, n=1) and s["b"] == dict(mean=2.0, std=pytest.approx(2 ** 0.5), n=2)
    assert np.isnan(s["c"]["mean"]) and s["c"]["n"] == 0


def test_learned_and_control_share_every_draw():
    """Same mask, C, noise and step: outside the mask neither changes; inside only eta_pred vs n differs."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, 16, 16, generator=g)
    fg = torch.ones(4, 1, 16, 16, dtype=torch.bool)
    draws = deviation.sample_synthesis(z, fg, (1.0, 3.0), "blobs", g)
    eta = deviation.build_unet("tiny", 2)
    torch.nn.init.normal_(eta.conv_out.weight)
    z_l, eta_pred = deviation.synthesise_latent(z, draws, eta)
    z_c, none = deviation.synthesise_latent(z, draws, None)
    outside = draws["m"].bool().expand_as(z)
    assert none is None and torch.equal(z_l[outside], z[outside]) and torch.equal(z_c[outside], z[outside])
    assert not torch.equal(z_l, z_c)
    # C is the deviation's RMS inside the mask, in latent stds, for both
    for z_a in (z_l, z_c):
        d = (z_a - z)[~outside].view(-1)
        inside = (~outside).flatten(1).sum(1)
        rms = ((z_a - z) ** 2).flatten(1).sum(1).div(inside).sqrt()
        torch.testing.assert_close(rms, draws["C"], rtol=1e-4, atol=1e-4)   # sums of ~100 squares: ~100 eps
        assert len(d)


def test_spectrum_slope_tells_white_from_smooth():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 1, 32, 32, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 40, 40, generator=g), 9, stride=1)
    assert abs(float(synthesise.spectrum_slope(white).mean())) < 0.5
    assert float(synthesise.spectrum_slope(smooth).mean()) < -2


@needs_taef2
def test_taef2_weights_load_and_a_folder_is_required(tmp_path):
    real = encode.load_vae("taef2", SHARED_WEIGHTS, random_init=True)          # an explicit file wins
    sd = torch.load(os.path.join(SHARED_WEIGHTS, "taef2_encoder.pth"), weights_only=True)
    assert torch.equal(real.encoder.state_dict()["0.weight"], sd["0.weight"].float())
    with pytest.raises(encode.WeightsUnavailable, match="taef2_decoder.pth"):
        encode.load_vae("taef2", str(tmp_path))


def test_taef2_offline_fails_fast(monkeypatch, tmp_path):
    import weights
    monkeypatch.setattr(weights, "probe", lambda *a, **k: "no route to https://raw.githubusercontent.com:443 (test)")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(encode.WeightsUnavailable, match="taef2_encoder.pth: not in .* --vae-weights"):
        encode.load_vae("taef2")


@needs_taef2
@needs_data
@pytest.mark.parametrize("name, least", [("brainmri", 30.0), ("busi", 30.0)])
def test_taef2_round_trip_on_real_scans(name, least):
    """PSNR of decode(encode(x)) on 16 test images at 224 px (measured: brainmri 33.7 dB, busi 34.8 dB)."""
    vae = encode.load_vae("taef2", SHARED_WEIGHTS)
    x, _ = data.load_images(data.load_split(name, SHARED_DATA, "test")[:16], 224)
    z = encode.encode_latents(vae, x)
    assert z.shape == (16, 32, 28, 28)
    with torch.no_grad():
        mse = ((encode.vae_decode(vae, z) - x) ** 2).mean(dim=(1, 2, 3))
    psnr = float((10 * torch.log10(1 / mse)).mean())
    print(f"TAEF2 round trip on {name}: PSNR {psnr:.1f} dB")
    assert psnr > least


@needs_taef2
@needs_data
def test_synthesis_in_a_real_latent_space(tmp_path):
    """eta_theta trained a few steps on real TAEF2 latents of a brain MRI (random tiny CLIP), then decoded."""
    path = train.main(train.parse_args(["--data", "brainmri", "--data-root", SHARED_DATA, "--shots", "1",
                                        "--random-init", "--clip", TINY_CLIP, "--vae", "taef2", "--vae-weights",
                                        SHARED_WEIGHTS, "--unet", "tiny", "--projection", "tiny", "--views", "4",
                                        "--batch-size", "4", "--steps", "6", "--eta-warmup", "2",
                                        "--out", str(tmp_path)]))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["latent_channels"] == 32 and not ckpt["config"]["vae_random"]
    s = synthesise.main(synthesise.parse_args(["--ckpt", path, "--n", "4"]))
    assert not any("random taef2" in w for w in s["warnings"])
    # a real decoder is local: the change of a one-cell perturbation stays within a few cells
    assert 4 <= s["decoder_reach_px"] <= 64
    assert s["control"]["locality_dilated"]["mean"] > 0.9
