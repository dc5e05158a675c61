"""realism.py: descriptors on drawn shapes whose values are known, the two-sample tests on samples whose answer is
known, the VAE round trip on every group, the dev / held protocol, and grey in -> grey out."""
import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import deviation
import encode
import lesions
import realism
import train
from test_train_eval import TINY

S = 128


def canvas(background=0.2):
    return torch.full((3, S, S), background)


def disc(r=20, cy=64, cx=64):
    yy, xx = np.mgrid[:S, :S]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def values(image, mask):
    return dict(zip(realism.DESCRIPTORS, lesions.describe(image, mask)))


def test_a_disc_of_known_contrast_and_radius():
    m = disc()
    x = canvas()
    x[:, torch.from_numpy(m)] = 0.5
    d = values(x, m)
    assert d["contrast"] == pytest.approx(0.3, abs=1e-6) and d["intensity"] == pytest.approx(0.5, abs=1e-6)
    assert d["area"] == pytest.approx(math.pi * 20 ** 2 / S ** 2, rel=0.03)
    assert d["compactness"] == pytest.approx(1.0, abs=0.08)
    assert d["saturation"] == 0 and d["texture"] == pytest.approx(0.0, abs=1e-6)
    assert d["pos_y"] == pytest.approx(0.5, abs=0.02) and d["pos_x"] == pytest.approx(0.5, abs=0.02)
    # a step edge of contrast c: about c / 2 across the outline (central differences)
    assert d["sharpness"] == pytest.approx(0.15, rel=0.35)
    blurred = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 3, 3)))
    assert values(blurred, m)["sharpness"] < 0.6 * d["sharpness"]


def test_a_ring_is_not_compact_and_a_coloured_blob_is_saturated():
    ring = disc(24) & ~disc(16)
    assert values(canvas(), ring)["compactness"] < 0.5
    x = canvas()
    x[:, torch.from_numpy(disc())] = torch.tensor([0.6, 0.4, 0.2])[:, None]
    assert values(x, disc())["saturation"] == pytest.approx(0.4, abs=1e-6)


def test_texture_and_spectrum_slope():
    g = torch.Generator().manual_seed(0)
    m = disc(30)
    x = canvas(0.5) + 0.05 * torch.randn(1, S, S, generator=g)            # grey noise, std 0.05 outside
    x[:, torch.from_numpy(m)] = 0.5 + 0.1 * torch.randn(1, int(m.sum()), generator=g)   # std 0.1 inside
    d = values(x, m)
    assert d["texture"] == pytest.approx(math.log(2), abs=0.15)
    assert abs(d["slope"]) < 0.8                                              # white noise: flat spectrum
    smooth = canvas(0.5) + torch.nn.functional.avg_pool2d(torch.randn(1, S + 16, S + 16, generator=g), 17,
                                                          stride=1)
    assert values(smooth, m)["slope"] < -2


def test_two_sample_tests_know_same_from_different():
    rng = np.random.default_rng(0)
    a, b, far = rng.normal(size=(200, 5)), rng.normal(size=(200, 5)), rng.normal(3, 1, size=(200, 5))
    assert 0.35 < realism.c2st(a, b, realism.forest, seed=0) < 0.65
    assert realism.c2st(a, far, realism.forest, seed=0) > 0.95
    # crops: noise images from one distribution, then with a bright disc in the middle
    g = torch.Generator().manual_seed(0)
    noise = lambda n: (0.5 + 0.1 * torch.randn(n, 3, 24, 24, generator=g)).clamp(0, 1).numpy()
    with_disc = noise(64)
    with_disc[:, :, 8:16, 8:16] += 0.3
    assert 0.3 < realism.c2st(noise(64), noise(64), realism.cnn, seed=0) < 0.7
    assert realism.c2st(noise(64), with_disc, realism.cnn, seed=0) > 0.95


def test_the_halves_are_fixed_and_disjoint():
    names = [f"img_{i:03d}" for i in range(101)]
    dev, held = realism.split_halves(names)
    assert len(dev) == 50 and len(held) == 51 and not set(dev) & set(held)
    assert realism.split_halves(list(reversed(names))) == (sorted(dev, reverse=True), sorted(held, reverse=True))


def test_keep_grey_keeps_the_label_and_removes_the_tint():
    """A stand-in colour decoder that tints where the latent leaves 'grey' values: keep_grey's change is the grey
    decoding's, and nothing outside the mask moves."""
    g = torch.Generator().manual_seed(0)
    z_n = torch.randn(2, 3, 8, 8, generator=g)
    m = torch.ones(2, 1, 8, 8)
    m[:, :, 2:6, 2:6] = 0
    z_anom = z_n + (1 - m) * torch.randn(2, 3, 8, 8, generator=g)
    grey = lambda z: z.mean(1, keepdim=True).expand_as(z)                    # R: the channel mean is the 'grey'
    z_g = deviation.keep_grey(z_n, z_anom, m, grey)
    outside = m.bool().expand_as(z_n)
    assert torch.equal(z_g[outside], z_n[outside])
    d = (z_g - z_n)
    torch.testing.assert_close(d, d.mean(1, keepdim=True).expand_as(d))    # the change itself is 'grey'


@pytest.fixture(autouse=True)
def quick_cnn(monkeypatch, request):
    """The end-to-end tests check plumbing, not the CNN: two epochs of it."""
    if "ckpt" in request.fixturenames:
        monkeypatch.setattr(realism, "cnn", functools.partial(realism.cnn, epochs=2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train.main(train.parse_args(TINY + ["--out", str(tmp_path_factory.mktemp("run"))]))


def test_every_group_goes_through_the_vae(ckpt, tmp_path, monkeypatch):
    """With a decoder that returns mid-grey whatever it is given, every group's lesions are mid-grey: real,
    latent modes and pixel modes alike went through decode(encode(.))."""
    monkeypatch.setattr(encode, "vae_decode", lambda vae, z: torch.full((len(z), 3, 64, 64), 0.5))
    r = realism.main(realism.parse_args(["--ckpt", ckpt, "--out", str(tmp_path), "--n", "12", "--seeds", "1"]))
    for half in ("dev", "held"):
        for group in ("real", *realism.MODES):
            assert r[half][group]["descriptors"]["intensity"]["mean"] == pytest.approx(0.5, abs=1e-6), group
            assert r[half][group]["saturation"]["mean"] == 0


def test_realism_writes_its_interface(ckpt, tmp_path):
    r = realism.main(realism.parse_args(["--ckpt", ckpt, ckpt, "--out", str(tmp_path), "--n", "12", "--seeds", "2"]))
    j = json.load(open(tmp_path / "realism.json"))
    assert (tmp_path / "realism.png").stat().st_size > 0 and "| real |" in (tmp_path / "realism.md").read_text()
    assert j["seeds"] == 2 and j["split"]["n_dev"] + j["split"]["n_held"] >= j["dev"]["real"]["n"] + j["held"]["real"]["n"]
    for half in ("dev", "held"):
        assert set(j[half]) == {"real", *realism.MODES}
        for mode in realism.MODES:
            for test in ("c2st_auc_descriptors", "c2st_auc_crops"):
                assert set(j[half][mode][test]) == {"mean", "std"} and 0 <= j[half][mode][test]["mean"] <= 1
            assert set(j[half][mode]["saturation"]) == {"mean", "std"}
    assert any("random medvae_tiny_2d" in w for w in r["warnings"])
    # tuning reads the dev half alone
    d = realism.main(realism.parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "dev"), "--n", "12", "--seeds", "1",
                                         "--halves", "dev"]))
    assert "held" not in d and "dev" in d


def test_seeds_whose_eta_read_another_noise_are_refused(ckpt, tmp_path):
    """Each seed's eta_theta must be given the noise it trained on: checkpoints of both kinds refused in one line."""
    from runfiles import load_checkpoint, save_checkpoint
    other = load_checkpoint(ckpt)
    other["config"]["eta_noise"] = "gaussian"
    save_checkpoint(other, str(tmp_path / "gaussian.pt"))
    with pytest.raises(ValueError, match=r"gaussian.pt: eta_theta trained on another --eta-noise"):
        realism.main(realism.parse_args(["--ckpt", ckpt, str(tmp_path / "gaussian.pt"), "--out", str(tmp_path / "o")]))


def test_real_lesions_from_an_mvfa_folder_of_tiff_masks_grey_and_rgb(tmp_path):
    """realism.py reads any dataset with lesion masks: here MVFA's layout, grey and RGB images and masks in PNG,
    JPEG and TIFF; the images come back RGB on [0, 1], the masks binary, split into the two fixed halves."""
    from PIL import Image
    base = tmp_path / "lesions"
    for sub in ("test/Ungood/img", "test/Ungood/anomaly_mask", "test/good/img", "valid/good/img"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        img = Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8))
        name = f"case{i}.{('png', 'jpg', 'tif')[i % 3]}"
        (img if i % 2 else img.convert("RGB")).save(base / "test/Ungood/img" / name)
        m = np.zeros((48, 48), np.uint8)
        m[10:20 + i, 12:24] = 255
        Image.fromarray(m).save(base / "test/Ungood/anomaly_mask" / name)
    img.save(base / "test/good/img/n.png")
    img.save(base / "valid/good/img/n.png")
    halves, split = realism.load_real("lesions", tmp_path, ["dev", "held"], 64)
    assert split["n_dev"] + split["n_held"] == 6
    for images, masks in halves.values():
        assert images.shape[1:] == (3, 64, 64) and 0 <= images.min() and images.max() <= 1
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and masks.flatten(1).sum(1).min() > 0
