"""The masked forward process, the masks, eta_theta and one-step synthesis."""
import torch
import torch.nn.functional as F

import deviation
from conftest import reorder_tol


def naive_masked_forward(x0, m, t, n, abar):
    """Element by element, straight from the equations in deviation.py's docstring."""
    x_t, eta = torch.empty_like(x0), torch.empty_like(x0)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x0.shape]):
        b, c, i, j = idx.tolist()
        a = abar[t[b]].item()
        x, mm, nn_ = x0[b, c, i, j].item(), m[b, 0, i, j].item(), n[b, c, i, j].item()
        x_t[b, c, i, j] = mm * x + (1 - mm) * (a ** 0.5 * x + (1 - a) ** 0.5 * nn_)
        eta[b, c, i, j] = (1 - mm) * (nn_ - (1 - a ** 0.5) / (1 - a) ** 0.5 * x)
    return x_t, eta


def test_masked_forward_matches_naive_reference_and_identity():
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 2, 5, 6, generator=g), torch.randn(3, 2, 5, 6, generator=g)
    m = (torch.rand(3, 1, 5, 6, generator=g) > 0.5).float()
    t = torch.tensor([0, 4, 9])
    abar = deviation.cosine_abar()
    x_t, eta = deviation.masked_forward(x0, m, t, n, abar)
    ref_x, ref_eta = naive_masked_forward(x0, m, t, n, abar)
    torch.testing.assert_close(x_t, ref_x)
    torch.testing.assert_close(eta, ref_eta)
    # x_t - x0 = sqrt(1 - abar_t) * eta, and the clean context is untouched
    torch.testing.assert_close(x_t - x0, (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eta)
    assert torch.equal(x_t[m.expand_as(x_t) == 1], x0[m.expand_as(x0) == 1])


def test_cosine_schedule():
    abar = deviation.cosine_abar()
    assert abar.shape == (deviation.T,) and (abar[1:] < abar[:-1]).all() and abar[0] < 1 and abar[-1] > 0


def test_patch_masks_fractions_and_shuffle_inside_corruption():
    g = torch.Generator().manual_seed(0)
    m, s = deviation.sample_patch_mask(64, 56, 56, g)
    corrupted = 1 - m.mean(dim=(1, 2, 3))
    assert m.shape == (64, 1, 56, 56) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert corrupted.max() <= deviation.MAX_CORRUPT + 0.05 and corrupted.std() > 0.05
    assert (s * m).sum() == 0                        # shuffled patches are always corrupted ones
    n = deviation.sample_noise(torch.randn(64, 1, 56, 56), s, g)
    assert n.shape == (64, 1, 56, 56)


def test_blob_masks_stay_in_the_foreground():
    g = torch.Generator().manual_seed(1)
    fg = torch.zeros(8, 1, 32, 32, dtype=torch.bool)
    fg[:, :, 8:24, 6:26] = True
    m = deviation.sample_blob_mask(fg, g)
    blob = m == 0
    assert blob.flatten(1).any(1).all() and not (blob & ~fg).any()


def test_synthesis_changes_only_the_masked_region_by_C_stds():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 1, 16, 16, generator=g)
    m = torch.ones(4, 1, 16, 16)
    m[:, :, 4:10, 4:10] = 0
    C = torch.tensor([1.0, 2.0, 3.0, 0.5])
    for kw in (dict(eta_pred=torch.randn(4, 1, 16, 16, generator=g)), dict(n=torch.randn(4, 1, 16, 16, generator=g))):
        d = deviation.synthesise(z, m, C, **kw) - z
        assert (d[m.expand_as(d) == 1] == 0).all()
        rms = d[:, :, 4:10, 4:10].pow(2).mean(dim=(1, 2, 3)).sqrt()
        torch.testing.assert_close(rms, C)


def test_unet_shapes_and_fits_a_tiny_problem():
    torch.manual_seed(0)
    net = deviation.build_unet("tiny", channels=2)
    assert net(torch.randn(3, 2, 15, 17), torch.tensor([0, 3, 9])).shape == (3, 2, 15, 17)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 8, 8, generator=g)
    m, s = deviation.sample_patch_mask(4, 8, 8, g)
    m[:, :, :4] = 0                                   # make sure every image has a deviation to find
    t = torch.tensor([2, 4, 6, 8])
    x_t, eta = deviation.masked_forward(x0, m, t, torch.randn(4, 2, 8, 8, generator=g))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        loss = torch.nn.functional.mse_loss(net(x_t, t), eta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_channels_last_unet_computes_what_a_plain_one_does():
    """build_unet keeps its weights channels-last (speed): the same function as the module in the default layout,
    and a checkpoint's state dict loads into either."""
    torch.manual_seed(0)
    net = deviation.build_unet("tiny", channels=1)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    plain = deviation.UNet(1, **deviation.UNET_PRESETS["tiny"])
    plain.load_state_dict(net.state_dict())
    x, t = torch.randn(3, 1, 12, 12), torch.tensor([0, 4, 9])
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ref = plain(x, t)
    # other kernels for the other layout: 3x3 convolutions of up to 64 input channels (576 terms), 12 along the path
    torch.testing.assert_close(net(x, t), ref, **reorder_tol(12 * 576, ref.abs().max()))


def disc(S, cy, cx, r):
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() <= r).float()[None, None]             # (1, 1, S, S)


def outline_error(shape, cy, cx, r):
    """Mean |distance to the centre - r| over the outline pixels of a bool (S, S) shape: 0 for a perfect disc."""
    S = shape.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    edge = shape & ~(-F.max_pool2d(-shape[None, None].float(), 3, stride=1, padding=1)[0, 0]).bool()
    return (((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()[edge] - r).abs().mean()


def test_soft_latent_masks_keep_a_discs_area_and_its_smooth_outline():
    """A disc drawn at image resolution, carried to an 8x coarser latent grid: the soft mask holds its area
    exactly, and its outline (read back bilinearly) follows the circle; the hard latent mask is a staircase."""
    S, h, cy, cx, r = 224, 28, 101.3, 117.8, 37.5
    label = disc(S, cy, cx, r)
    m = deviation.soft_latent_mask(label, (h, h))
    assert m.shape == (1, 1, h, h) and 0 <= m.min() and m.max() <= 1
    torch.testing.assert_close((1 - m).sum() * (S // h) ** 2, label.sum())            # the area, exactly
    assert ((m > 0) & (m < 1)).sum() > 20                                              # the outline's cells: in part
    soft = F.interpolate(1 - m, size=(S, S), mode="bilinear", align_corners=False)[0, 0] >= 0.5
    hard = F.interpolate(((1 - m) >= 0.5).float(), size=(S, S), mode="nearest")[0, 0].bool()
    assert outline_error(soft, cy, cx, r) < 1.0 < 1.5 < outline_error(hard, cy, cx, r)


def test_lesion_draws_label_at_image_resolution_inside_the_anatomy():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 2, 8, 8, generator=g)
    fg = torch.zeros(6, 1, 64, 64, dtype=torch.bool)
    fg[:, :, 10:54, 16:60] = True
    draws = deviation.sample_synthesis(z, fg, (1.0, 3.0), "lesions", g)
    label, m = draws["label"], draws["m"]
    assert label.shape == (6, 1, 64, 64) and m.shape == (6, 1, 8, 8)
    assert label.flatten(1).amax(1).eq(1).all() and not (label.bool() & ~fg).any()
    torch.testing.assert_close(1 - m, F.adaptive_avg_pool2d(label, (8, 8)))
    # the other modes give their latent mask at image resolution as the label
    for mode in ("blobs", "patches"):
        d = deviation.sample_synthesis(z, fg, (1.0, 3.0), mode, g)
        assert torch.equal(d["label"], F.interpolate(1 - d["m"], size=(64, 64), mode="nearest"))


def test_smooth_eta_keeps_constants_and_removes_fine_texture():
    from synthesise import spectrum_slope
    g = torch.Generator().manual_seed(4)
    const = torch.full((2, 3, 16, 16), 0.7)
    torch.testing.assert_close(deviation.smooth_eta(const, 1.5), const)
    noise = torch.randn(8, 4, 32, 32, generator=g)
    assert torch.equal(deviation.smooth_eta(noise, 0), noise)
    smooth = deviation.smooth_eta(noise, 1.5)
    assert smooth.shape == noise.shape
    assert spectrum_slope(smooth).mean() < spectrum_slope(noise).mean() - 2       # much redder than white noise
    # cell-to-cell differences shrink far more than the field itself
    diff = lambda d: (d[..., 1:] - d[..., :-1]).pow(2).mean() / d.pow(2).mean()
    assert diff(smooth) < 0.2 * diff(noise)


def test_tissue_source_is_the_images_own_latent_moved_and_keeps_the_other_draws():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 2, 8, 8, generator=g)
    fg = torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    fg[:, :, 16:48, 16:48] = True
    plain = deviation.sample_synthesis(z, fg, (1.0, 3.0), "lesions", torch.Generator().manual_seed(0))
    draws = deviation.sample_synthesis(z, fg, (1.0, 3.0), "lesions", torch.Generator().manual_seed(0), 0, "tissue")
    assert all(torch.equal(plain[k], draws[k]) for k in plain)              # the control's draws do not change
    n_eta = draws["n_eta"]
    for b in range(4):   # a roll of the image's own latent: the same values, moved
        assert torch.equal(n_eta[b].flatten(1).sort(1).values, z[b].flatten(1).sort(1).values)
        assert any(torch.equal(n_eta[b], torch.roll(z[b], (dy, dx), (-2, -1))) for dy in range(8) for dx in range(8))
    eta = deviation.build_unet("tiny", 2)
    torch.nn.init.normal_(eta.conv_out.weight)
    z_t, _ = deviation.synthesise_latent(z, draws, eta)
    z_p, _ = deviation.synthesise_latent(z, plain, eta)
    assert not torch.equal(z_t, z_p) and torch.equal(deviation.synthesise_latent(z, draws)[0],
                                                     deviation.synthesise_latent(z, plain)[0])


def test_surrogate_noise_has_the_latents_spectrum_and_channel_structure():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 1, 16, 16, generator=g).cumsum(-1).cumsum(-2)              # red, like an image's latent
    z = torch.cat([z, 2 * z - 1, torch.randn(4, 1, 16, 16, generator=g)], 1)       # channel 1 moves with channel 0
    n = deviation.sample_surrogate(z, g)
    assert n.shape == z.shape
    # tolerances: two FFTs of 16 x 16 cells (error ~ log2(256) eps of the values, |z| up to ~30 here) and a mean
    torch.testing.assert_close(n.mean(dim=(2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.pow(2).mean(dim=(1, 2, 3)), torch.ones(4))          # unit RMS, like Gaussian n
    torch.testing.assert_close(n[:, 1], 2 * n[:, 0], atol=1e-4, rtol=0)              # the channels' relation kept
    power = lambda a: torch.fft.rfft2(a - a.mean(dim=(-2, -1), keepdim=True)).abs().flatten(2)[..., 1:]
    ratio = power(n) / power(z)                                                       # (B, c, f): one gain per image
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-3, atol=0)
    centred = z - z.mean(dim=(2, 3), keepdim=True)
    assert not torch.allclose(n, centred * ratio[:, 0, 0].view(4, 1, 1, 1))        # the phases are new
    # training draws it where the patches are not shuffled; the synthesis gives it to eta_theta, the control keeps n
    fg = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    plain = deviation.sample_synthesis(z, fg, (1.0, 3.0), "lesions", torch.Generator().manual_seed(0))
    draws = deviation.sample_synthesis(z, fg, (1.0, 3.0), "lesions", torch.Generator().manual_seed(0), 0, "noise",
                                       "surrogate")
    assert all(torch.equal(plain[k], draws[k]) for k in plain) and draws["n_eta"].shape == z.shape
