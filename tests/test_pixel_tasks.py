"""Pixel-space anomaly synthesis: exact labels, ranges, determinism, MediCLIP's task mix, the bank."""
import time

import pytest
import torch

import pixel_tasks as pt

S = 64


def phantom(seed, size=S):
    """A bright textured ellipse on a black background, 3 identical channels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = (xx / 0.8) ** 2 + (yy / 0.6) ** 2 < 1
    tex = 0.5 + 0.3 * torch.rand(size, size, generator=g) + 0.15 * torch.sin(6 * xx + 3 * yy + seed)
    return (tex * inside).clamp(0, 1).expand(3, size, size).clone()   # (3, S, S)


IMAGE, SOURCE = phantom(0), phantom(1)
FG = pt.foreground(IMAGE)
OTHERS = torch.stack([IMAGE, SOURCE])
TASKS = {
    "cutpaste": lambda g: pt.cutpaste(IMAGE, SOURCE, g, FG),
    "gauss_intensity": lambda g: pt.gauss_intensity(IMAGE, g, FG),
    "source_warp": lambda g: pt.source_warp(IMAGE, g, FG),
    "pixel_noise": lambda g: pt.pixel_noise(IMAGE, g, FG),
    "identity": lambda g: pt.identity(IMAGE),
    "synthesise_mediclip": lambda g: pt.synthesise_mediclip(IMAGE, OTHERS, g, FG),
}


def run(name, seed):
    return TASKS[name](torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TASKS))
def test_task_output_and_exact_mask(name):
    changed = 0
    for seed in range(6):
        out, mask = run(name, seed)
        assert out.shape == IMAGE.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        assert mask.shape == (1, S, S) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask, (out != IMAGE).any(dim=0, keepdim=True).float())
        changed += int(mask.any())
    if name == "identity":
        assert changed == 0
    elif name == "synthesise_mediclip":
        assert changed > 0
    else:
        assert changed == 6


@pytest.mark.parametrize("name", [n for n in TASKS if n != "identity"])
def test_determinism(name):
    a, b, c = run(name, 7), run(name, 7), run(name, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_source_warp_is_local():
    nonempty = 0
    for seed in range(20):
        _, mask = run("source_warp", seed)
        ys, xs = mask[0].nonzero(as_tuple=True)
        if len(ys) == 0:
            continue
        nonempty += 1
        # semi-axes <= 0.2 S, outline bent by at most a factor 1.7: the warp fits in a box of side 0.68 S
        assert ys.max() - ys.min() <= 0.68 * S + 2 and xs.max() - xs.min() <= 0.68 * S + 2
        assert mask.mean() < 0.5
    assert nonempty >= 18


def test_random_shape_in_foreground_and_never_empty():
    fg = torch.zeros(S, S, dtype=torch.bool)
    fg[20:40, 10:30] = True
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        shape = pt.random_shape(S, g, fg)
        assert shape.shape == (S, S) and shape.dtype == torch.bool
        assert shape.any() and not (shape & ~fg).any()
        free = pt.random_shape(S, g, None, min_r=0.0, max_r=0.001)     # tiny radius: still the centre pixel
        assert free.sum() >= 1
        empty = pt.random_shape(S, g, torch.zeros(S, S, dtype=torch.bool))
        assert empty.any()


def counting(fn, name, calls):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapped


def test_mediclip_draws_every_task(monkeypatch):
    calls = {t: 0 for t in ("cutpaste", "gauss_intensity", "source_warp", "identity")}
    for name in calls:
        monkeypatch.setattr(pt, name, counting(getattr(pt, name), name, calls))
    empty = 0
    for seed in range(40):
        _, mask = run("synthesise_mediclip", seed)
        empty += int(not mask.any())
    assert all(v > 0 for v in calls.values()), calls
    assert 40 <= sum(calls.values()) <= 80                              # one or two anomalies per image
    assert 0 < empty < 40                                               # identity-only draws leave no label


def test_build_bank():
    views = torch.stack([phantom(i) for i in range(4)])
    for mode in ("mediclip", "pixel-noise"):
        images, masks = pt.build_bank(views, 10, mode, seed=0)
        assert images.shape == (10, 3, S, S) and masks.shape == (10, 1, S, S)
        again = pt.build_bank(views, 10, mode, seed=0)
        assert torch.equal(images, again[0]) and torch.equal(masks, again[1])
        assert not torch.equal(images, pt.build_bank(views, 10, mode, seed=1)[0])
        assert masks.sum() > 0
    with pytest.raises(ValueError, match="mediclip"):
        pt.build_bank(views, 2, "gaussian", seed=0)


def test_build_bank_runtime():
    views = torch.stack([phantom(i, 224) for i in range(8)])
    t0 = time.perf_counter()
    images, masks = pt.build_bank(views, 128, "mediclip", seed=0)
    print(f"\nbuild_bank mediclip n=128 S=224: {time.perf_counter() - t0:.2f} s")
    assert images.shape == (128, 3, 224, 224) and masks.shape == (128, 1, 224, 224)
