"""
The projection head P_theta: MedVAE latents straight into CLIP's patch-token space, one output per CLIP layer.

Synthetic anomalies are made in latent space (deviation.py); instead of decoding them to pixels and running
CLIP again, P_theta maps the latent grid (c, h, w) to the token grids (D, H, W) of the CLIP layers the detector
reads. It is kept aligned with the real frozen CLIP tokens of the same normal views by

    L_align = 1 - cos(P_theta(z_n), CLIP tokens),   averaged over tokens and layers,

so that a detector trained on projected tokens also works on real CLIP tokens at test time.

    import project
    P = project.build_projection("small", latent_channels=1, token_dim=1024, token_hw=16, n_layers=3)
    tokens = P(z)                                  # list of (B, D, H, W)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTION_PRESETS = {"tiny": dict(width=32, depth=1), "small": dict(width=128, depth=2),
                      "base": dict(width=256, depth=3)}


def pool_matrix(n, N, device=None):
    """(N, n): row i averages the cells [floor(i n / N), ceil((i + 1) n / N)) (adaptive average pooling's windows)."""
    i = torch.arange(N, device=device)[:, None]
    j = torch.arange(n, device=device)[None]
    inside = (j >= i * n // N) & (j < -(-(i + 1) * n // N))
    return inside / inside.sum(1, keepdim=True)


def area_pool(x, hw):
    """F.adaptive_avg_pool2d(x, hw) as two small matrix products on the channels-last layout: the same windows and
    weights, but its backward is a matmul, where adaptive pooling's CPU backward zero-fills and scatters a full-size
    gradient (fp32, 2 CPU cores, 16 x 128 x 56 x 56 -> 14 x 14: forward + backward 20 -> 8 ms)."""
    Ph = pool_matrix(x.shape[-2], hw, x.device).to(x.dtype)
    Pw = pool_matrix(x.shape[-1], hw, x.device).to(x.dtype)
    B, C, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(B, h, w * C)               # (B, h, w C), no copy when channels-last
    y = (Ph @ x).view(B * hw, w, C)                               # (B H, w, C)
    return (Pw @ y).view(B, hw, hw, C).permute(0, 3, 1, 2)        # (B, C, H, W), channels-last


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(min(32, c), c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(self.norm(x))))


class Projection(nn.Module):
    """(B, c, h, w) latents -> list over layers of (B, D, H, W) tokens."""

    def __init__(self, latent_channels, token_dim, token_hw, n_layers, width=256, depth=2):
        super().__init__()
        self.token_hw = token_hw
        self.stem = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(width) for _ in range(depth)])
        # every CLIP layer reads its own linear head of the shared trunk
        self.heads = nn.ModuleList(nn.Conv2d(width, token_dim, 1) for _ in range(n_layers))

    def forward(self, z):
        x = F.gelu(self.stem(z))                                   # (B, width, h, w)
        # the latent grid is finer than the token grid (4 px vs 14-16 px cells): area-average down to it
        x = area_pool(x, self.token_hw)                            # (B, width, H, W)
        x = self.blocks(x)
        return [head(x) for head in self.heads]                    # each (B, D, H, W)


def build_projection(preset, latent_channels, token_dim, token_hw, n_layers):
    # channels-last weights: the tokens come out channels-last, as CLIP's do (encode.CLIPTokens), and the
    # adapters' LayerNorm over D reads both without a copy
    return Projection(latent_channels, token_dim, token_hw, n_layers,
                      **PROJECTION_PRESETS[preset]).to(memory_format=torch.channels_last)


def cosine_tokens(p, t, eps=1e-8):
    """(B, D, H, W) twice -> (B, H, W): F.cosine_similarity over D, the dot product divided by the two norms
    (clamped at eps, as F.cosine_similarity). It divides the (B, H, W) norms, where F.cosine_similarity divides
    both inputs at every channel, forward and backward (fp32, 2 CPU cores, 3 layers of a ViT-B-16 batch: ~10 ms
    of a training step)."""
    return (p * t).sum(1) / (p.norm(dim=1).clamp_min(eps) * t.norm(dim=1).clamp_min(eps))


def alignment_loss(projected, tokens):
    """1 - cosine similarity per token, averaged over tokens and layers; also returns the mean cosine."""
    cos = torch.stack([cosine_tokens(p.float(), t).mean() for p, t in zip(projected, tokens)]).mean()
    return 1 - cos, cos.detach()
