"""MediCLIP parts: zero-shot initialisation, map shapes, losses against hand-computed values."""
import pytest
import torch
import torch.nn.functional as F

import encode
import mediclip
import project
from conftest import reorder_tol


def test_untrained_adapters_are_clips_own_head(tiny_clip):
    det = mediclip.build_mediclip(tiny_clip, n_layers=2)
    tok = torch.randn(2, 64, 4, 4)
    v = tiny_clip.visual
    ref = F.normalize(v.ln_post(tok.permute(0, 2, 3, 1)) @ v.proj, dim=-1)
    torch.testing.assert_close(det.adapters[1](tok), ref)


def test_map_shapes_and_probabilities(tiny_clip):
    det = mediclip.build_mediclip(tiny_clip, n_layers=3)
    text = det.text_features(mediclip.TextTower(tiny_clip))
    assert text.shape == (32, 2)
    torch.testing.assert_close(text.norm(dim=0), torch.ones(2))
    probs = det([torch.randn(2, 64, 4, 4) for _ in range(3)], text, 64)
    assert probs.shape == (2, 2, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))
    assert mediclip.image_scores(probs).shape == (2,)
    top1 = mediclip.image_scores(probs, topk=1)
    torch.testing.assert_close(top1, mediclip.image_scores(probs))


def test_maps_are_the_softmax_of_the_upsampled_logits(tiny_clip):
    """MediCLIP's map, softmax over the classes of the logits upsampled to the image, computed as the sigmoid of the
    upsampled difference (half the upsampling) of logits divided by the features' norms after the product with the
    text (Adapter.similarity): the same values, and the same gradients for the adapters."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=2).double()
    text = torch.nn.functional.normalize(torch.randn(32, 2, dtype=torch.float64), dim=0)
    tokens = [torch.randn(2, 64, 4, 4, dtype=torch.float64) for _ in range(2)]
    ours = det(tokens, text, 32)
    logits = torch.stack([a(t) @ text for a, t in zip(det.adapters, tokens)]).mean(0)        # (B, H, W, 2)
    ref = F.interpolate(logits.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=True).softmax(1)
    torch.testing.assert_close(ours, ref)
    w = det.adapters[0].proj.weight
    g_ours, g_ref = (torch.autograd.grad((p * torch.arange(p.numel()).view_as(p)).sum(), w)[0] for p in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref)


def test_only_learnable_parts_are_saved(tiny_clip):
    keys = mediclip.build_mediclip(tiny_clip, n_layers=2).state_dict().keys()
    assert set(keys) == {"prompts.ctx_normal", "prompts.ctx_abnormal", "adapters.0.ln.weight", "adapters.0.ln.bias",
                         "adapters.0.proj.weight", "adapters.1.ln.weight", "adapters.1.ln.bias",
                         "adapters.1.proj.weight"}


def test_focal_and_dice_hand_computed():
    probs = torch.tensor([0.2, 0.8, 0.6, 0.4]).view(1, 1, 2, 2)
    probs = torch.cat([1 - probs, probs], dim=1)               # (1, 2, 2, 2)
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    s = 1e-5
    # pt = probability of the true class (+ smoothing of the one-hot, as MediCLIP)
    pt = torch.tensor([0.8, 0.8, 0.4, 0.4]) * (1 - s) + torch.tensor([0.2, 0.2, 0.6, 0.6]) * s + s
    ref_focal = (-(1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(mediclip.focal_loss(probs, mask), ref_focal)
    ref_dice = 1 - (2 * (0.8 + 0.4) + 1) / (2.0 + 2 + 1)
    torch.testing.assert_close(mediclip.dice_loss(probs, mask), torch.tensor(ref_dice))


def test_alignment_improves_under_training():
    torch.manual_seed(0)
    P = project.build_projection("tiny", latent_channels=1, token_dim=24, token_hw=4, n_layers=2)
    z = torch.randn(8, 1, 16, 16)
    target_map = torch.nn.Conv2d(1, 24, 4, stride=4)          # a fixed "CLIP" that the projection must learn
    with torch.no_grad():
        tokens = [target_map(z), target_map(z).roll(1, dims=1)]
    opt = torch.optim.Adam(P.parameters(), lr=3e-3)
    cos0 = project.alignment_loss(P(z), tokens)[1]
    for _ in range(150):
        loss, cos = project.alignment_loss(P(z), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [t.shape for t in P(z)] == [(8, 24, 4, 4)] * 2
    assert cos > cos0 + 0.3 and cos > 0.8


def test_text_tower_with_bf16_linears_is_the_autocast_tower_to_rounding(tiny_clip):
    """train.py's bf16 steps run a copy of the tower whose linear weights are cast once and whose QuickGELU is
    folded into them: features and context gradients as close to fp32's as the tower whose weights autocast
    casts at every use; the CLIP model's own weights and activation stay as they were."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=1)
    out = []
    for tower, ac in ((mediclip.TextTower(tiny_clip), False), (mediclip.TextTower(tiny_clip), True),
                      (mediclip.TextTower(tiny_clip, torch.bfloat16), True)):
        x, eot = det.prompts()
        x = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            f = tower(x, eot)
        out.append((f.float(), torch.autograd.grad(f.float().square().sum(), x)[0]))
    (f32, g32), (f_ac, g_ac), (f_copy, g_copy) = out
    err = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert err(f_copy, f32) < 2 * err(f_ac, f32) + 1e-3 and err(g_copy, g32) < 2 * err(g_ac, g32) + 1e-3
    assert tower.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tiny_clip.transformer.parameters())
    assert encode.clip_activation(tiny_clip) == "quickgelu"


def test_token_cosine_is_cosine_similarity():
    """project.cosine_tokens divides the norms, not the inputs: F.cosine_similarity's values and gradients."""
    p = torch.randn(3, 24, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    t = torch.randn(3, 24, 4, 4, dtype=torch.float64)
    ours, ref = project.cosine_tokens(p, t), F.cosine_similarity(p, t, dim=1)
    torch.testing.assert_close(ours, ref)
    w = torch.arange(ref.numel(), dtype=torch.float64).view_as(ref)
    torch.testing.assert_close(*(torch.autograd.grad((c * w).sum(), p)[0] for c in (ours, ref)))


@pytest.mark.parametrize("hw", [(16, 4), (56, 14), (56, 16), (15, 4), (7, 7)])
def test_area_pool_is_adaptive_average_pooling(hw):
    n, N = hw
    x = torch.randn(2, 5, n, n, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        x_ = x.clone().contiguous(memory_format=layout).requires_grad_()
        ref_x = x.clone().requires_grad_()
        y, ref = project.area_pool(x_, N), F.adaptive_avg_pool2d(ref_x, N)
        torch.testing.assert_close(y, ref)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(ref)
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x_.grad, ref_x.grad)


def test_tokens_are_channels_last_so_the_adapters_read_them_without_a_copy(tiny_clip):
    """CLIP's tokens and P_theta's come out (B, D, H, W) with D last in memory; the detector's maps are the same
    whichever layout it is given."""
    tokens = encode.encode_tokens(encode.CLIPTokens(tiny_clip, (2, 4)), torch.rand(2, 3, 64, 64), tiny_clip)
    P = project.build_projection("tiny", latent_channels=1, token_dim=64, token_hw=4, n_layers=2)
    projected = P(torch.randn(2, 1, 16, 16))
    for t in tokens + projected:
        assert t.is_contiguous(memory_format=torch.channels_last)
    det = mediclip.build_mediclip(tiny_clip, 2)
    with torch.no_grad():
        text = det.text_features(mediclip.TextTower(tiny_clip))
        torch.testing.assert_close(det(tokens, text, 64), det([t.contiguous() for t in tokens], text, 64))


def test_prompt_text_tower_reproduces_encode_text(tiny_clip):
    """Contexts initialised from a phrase's token embeddings give open_clip's own encode_text of it."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=1)
    x, eot = det.prompts()
    ours = mediclip.TextTower(tiny_clip)(x, eot)
    ids, _ = mediclip.tokenize_prompts()
    with torch.no_grad():
        ref = tiny_clip.encode_text(ids)
    # packed vs open_clip's padded, fused path: 2 blocks of attention (32) and MLP (128 + 32) sums, the projection
    torch.testing.assert_close(ours, ref, **reorder_tol(2 * (32 + 128 + 32) + 32, ref.abs().max()))


def test_text_tower_gradients_match_the_fused_attention(tiny_clip):
    """On the CPU the tower runs attention by the plain maths path (faster backward there): the same features and
    the same gradients for the prompt contexts as open_clip's own (fused) path."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=1)
    x, eot = det.prompts()
    x = x.detach().requires_grad_()
    ours = mediclip.TextTower(tiny_clip)(x, eot)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    L = int(eot.max()) + 1                        # open_clip's transformer on the same cut sequence, default kernel
    h = (x[:, :L] + tiny_clip.positional_embedding[:L]).transpose(0, 1)          # (L, N, W): open_clip 2.x
    h = tiny_clip.transformer(h, attn_mask=tiny_clip.attn_mask[:L, :L]).transpose(0, 1)
    ref = tiny_clip.ln_final(h)[torch.arange(len(x)), eot] @ tiny_clip.text_projection
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    # the maths path against the fused kernel: as above; the gradient runs the chain back again (twice the sums)
    torch.testing.assert_close(ours, ref, **reorder_tol(2 * (32 + 128 + 32) + 32, ref.abs().max()))
    torch.testing.assert_close(g_ours, g_ref, **reorder_tol(4 * (32 + 128 + 32) + 64, g_ref.abs().max()))


def test_text_tower_packs_the_prompts_exactly(tiny_clip):
    """CLIP's towers run the prompts packed (no cell after an EOT computed, and the last block only at each EOT); the
    padded path, which other towers take, gives the same features and the same gradients for the contexts."""
    det = mediclip.build_mediclip(tiny_clip, n_layers=1)
    tower = mediclip.TextTower(tiny_clip)
    assert tower.packed
    x, eot = det.prompts()
    assert len(set(eot.tolist())) > 1             # prompts of several lengths: the packing has cells to skip
    out = {}
    for packed in (True, False):
        tower.packed = packed
        xg = x.detach().requires_grad_()
        f = tower(xg, eot)
        out[packed] = f, torch.autograd.grad(f.square().sum(), xg)[0]
    f, g = out[False]                    # as in the test above: packed rows sum in another order than padded ones
    torch.testing.assert_close(out[True][0], f, **reorder_tol(2 * (32 + 128 + 32) + 32, f.abs().max()))
    torch.testing.assert_close(out[True][1], g, **reorder_tol(4 * (32 + 128 + 32) + 64, g.abs().max()))
    assert not mediclip.is_plain_block(torch.nn.Linear(2, 2))
