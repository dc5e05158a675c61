"""
TAEF2, the Tiny AutoEncoder for FLUX.2's VAE (madebyollin/taesd, MIT): a real, pretrained autoencoder small enough
(1.34M parameters each way) to run offline here, so that the synthesis can be looked at and measured in a real
latent space while MedVAE's weights cannot be had. Not medical: an RGB autoencoder for photographs.
(B, 3, H, W) in [0, 1] <-> (B, 32, H/8, W/8). encode.load_vae("taef2", FOLDER) loads its published files.

    import taef2
    vae = taef2.TAEF2()
    z = vae.encode(x); x_rec = vae.decode(z)
"""
import torch
import torch.nn as nn


class TAEBlock(nn.Module):
    """Three 3x3 convs with ReLUs, plus the input, then ReLU. `pooled`: TAEF2's mid blocks first add a 1x1-conv
    -> GroupNorm -> ReLU -> 1x1-conv branch (4x wider), whose GroupNorm brings in per-image statistics."""

    def __init__(self, c=64, pooled=False):
        super().__init__()
        conv = lambda: nn.Conv2d(c, c, 3, padding=1)
        self.conv = nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU(), conv())
        self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                  nn.Conv2d(4 * c, c, 1, bias=False)) if pooled else None
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class TanhClamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3                      # latents are soft-clamped to (-3, 3) before decoding


class TAEF2(nn.Module):
    """TAEF2 (tiny autoencoder for FLUX.2's VAE, madebyollin/taesd): (B, 3, H, W) in [0, 1] <-> (B, 32, H/8, W/8).
    Three stride-2 stages of 64-channel blocks each way; the state-dict indices follow its published files."""

    def __init__(self, latent_channels=32, c=64):
        super().__init__()
        down = lambda: nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        up = lambda: [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1, bias=False)]
        blocks = lambda n, pooled=False: [TAEBlock(c, pooled) for _ in range(n)]
        self.encoder = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *blocks(1), down(), *blocks(3), down(),
                                     *blocks(3), down(), *blocks(3, pooled=True), nn.Conv2d(c, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(TanhClamp(), nn.Conv2d(latent_channels, c, 3, padding=1), nn.ReLU(),
                                     *blocks(3, pooled=True), *up(), *blocks(3), *up(), *blocks(3), *up(), *blocks(1),
                                     nn.Conv2d(c, 3, 3, padding=1))

    def encode(self, x):
        return self.encoder(x)                            # (B, 32, H/8, W/8)

    def decode(self, z):
        return self.decoder(z).clamp(0, 1)                # (B, 3, H, W)
