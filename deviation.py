"""
The deviation predictor eta_theta and DeCo-Diff's masked forward process (Beizaee et al., "Correcting
Deviations from Normality: A Reformulated Diffusion Model for Multi-Class Unsupervised Anomaly Detection",
CVPR 2025), used here to *synthesise* anomalies in MedVAE latent space.

Masked forward process (m = 1 marks clean context, t ~ U{0..T-1}, cosine schedule, T = 10):
    x_t = m * x0 + (1 - m) * (sqrt(abar_t) * x0 + sqrt(1 - abar_t) * n)
    eta = (1 - m) * (n - k_t * x0),   k_t = (1 - sqrt(abar_t)) / sqrt(1 - abar_t)
so that x_t - x0 = sqrt(1 - abar_t) * eta. eta_theta(x_t, t) predicts eta with an MSE over the whole latent;
it is not given the mask, so it must find the deviating region itself.
In DeCo-Diff n is Gaussian; here, by default, it is the latent's own phase-randomised surrogate (sample_surrogate:
the normal image's spectrum and channel structure, random phases), so that eta_theta learns deviations as smooth
as anatomy, whose decoding is a mass, not 8-px tiles (docs/realism.md; train.py
--eta-noise gaussian gives DeCo-Diff's). Either way, in a fraction (U(0, 0.3)) of the corrupted patches n is the
latent of another image of the batch at the same place (DeCo-Diff's shuffled patches).

Synthesis in one step (the seed's method):
    z_anom = z_n + C * (1 - m) * eta_theta(x_t, t) / rms,   label = the region, at image resolution
(x_t from n_eta, a surrogate, by default) and the control without a network: z_n + C * (1 - m) * n, n Gaussian.
The region is drawn at image resolution (a smooth blob inside the anatomy) and m is its area share per latent
cell (a soft mask), so that the decoded anomaly follows the drawn outline, not the latent grid's 8-px staircase
(sample_synthesis, soft_latent_mask).
Grey-scale images in a latent space that decodes colour (TAEF2) keep grey anomalies: the latent change is
replaced by that of the anomaly's grey decoding (keep_grey); the 1-channel MedVAEs decode grey by construction.

    import deviation
    eta = deviation.build_unet("small", channels=1)
    x_t, target = deviation.masked_forward(z, m, t, n)
    draws = deviation.sample_synthesis(z, deviation.foreground(views), (0.5, 1.5), noise="surrogate")
    z_anom, eta_pred = deviation.synthesise_latent(z, draws, eta)      # eta=None: the latent-noise control
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import encode

T = 10
PATCH_SIZES = (1, 2, 4, 8, 16)          # DeCo-Diff's patch sizes, in cells of a 32x32 latent grid
PATCH_PROBS = (0.30, 0.25, 0.20, 0.15, 0.10)
MAX_CORRUPT = 0.7                        # corrupted fraction ~ U(0, 0.7) per image
MAX_SHUFFLE = 0.3                        # fraction of corrupted patches filled by shuffled latents ~ U(0, 0.3)
UNET_PRESETS = {                         # width, channel multipliers per level, res blocks per level
    "tiny": dict(width=16, mults=(1, 2), blocks=1),
    "small": dict(width=32, mults=(1, 2, 4), blocks=1),
    "base": dict(width=64, mults=(1, 2, 4), blocks=2),
}


def cosine_abar(steps=T, s=0.008):
    """abar_t for t = 0..steps-1 (Nichol & Dhariwal 2021), betas clipped at 0.999 as usual."""
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


def standardise(z):
    """z_n = (z - mean) / std per channel; and the mean and std (stored: synthesise.py decodes with them)."""
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std


def masked_forward(x0, m, t, n, abar=None):
    """x0, m, n (B, c, h, w), t (B,) -> x_t and the target eta, both (B, c, h, w)."""
    abar = (cosine_abar() if abar is None else abar).to(x0.device)[t].view(-1, 1, 1, 1)
    k = (1 - abar.sqrt()) / (1 - abar).sqrt()
    x_t = m * x0 + (1 - m) * (abar.sqrt() * x0 + (1 - abar).sqrt() * n)
    eta = (1 - m) * (n - k * x0)
    return x_t, eta


def sample_patch_mask(B, h, w, gen, device="cpu"):
    """DeCo-Diff patch masks. Returns m (B, 1, h, w) with 1 = clean, and s (B, 1, h, w), 1 = shuffled patch."""
    m, s = torch.ones(B, 1, h, w), torch.zeros(B, 1, h, w)
    sizes = torch.multinomial(torch.tensor(PATCH_PROBS), B, replacement=True, generator=gen)
    for b in range(B):
        p = max(1, round(PATCH_SIZES[sizes[b]] * h / 32))           # patch side in latent cells
        gh, gw = math.ceil(h / p), math.ceil(w / p)
        rank = torch.rand(gh * gw, generator=gen).argsort().argsort()
        corrupt = rank < round(float(torch.rand(1, generator=gen)) * MAX_CORRUPT * gh * gw)
        shuffle = corrupt & (torch.rand(gh * gw, generator=gen) < float(torch.rand(1, generator=gen)) * MAX_SHUFFLE)
        up = lambda g: g.view(gh, gw).float().repeat_interleave(p, 0).repeat_interleave(p, 1)[:h, :w]
        m[b, 0], s[b, 0] = 1 - up(corrupt), up(shuffle)
    return m.to(device), s.to(device)


def sample_noise(x0, s, gen, kind="gaussian"):
    """n: Gaussian (DeCo-Diff) or x0's own surrogate (sample_surrogate), except where s = 1, where it is the latent
    of the next image in the batch (shuffled patches)."""
    n = torch.randn(x0.shape, generator=gen).to(x0.device) if kind == "gaussian" else sample_surrogate(x0, gen)
    return torch.where(s.bool().expand_as(x0), x0.roll(1, dims=0), n)


def sample_surrogate(x0, gen):
    """Noise with each latent's own spectrum and cross-channel structure: every Fourier coefficient of x0 turned by
    a random phase shared by all channels (a multivariate phase-randomised surrogate, Prichard & Theiler 1994),
    mean removed, unit RMS per image like Gaussian n. The normal image alone sets how smooth the deviation is and
    how its channels move together (a grey image's change stays grey); no sign or size prior. (B, c, h, w)"""
    B, c, h, w = x0.shape
    turn = torch.fft.rfft2(torch.randn(B, 1, h, w, generator=gen).to(x0.device))   # (B, 1, h, w // 2 + 1)
    turn = turn / turn.abs().clamp_min(1e-12)                  # unit phases, Hermitian like a real field's
    n = torch.fft.irfft2(torch.fft.rfft2(x0.float()) * turn, s=(h, w))             # (B, c, h, w)
    n = n - n.mean(dim=(2, 3), keepdim=True)
    return n / n.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def sample_blob_mask(fg, gen, min_r=0.08, max_r=0.25, field_hw=None):
    """One smooth, irregular blob per image inside the foreground fg (B, 1, h, w) bool. Returns m, 1 = clean.
    The outline bends with a smooth random field drawn on field_hw (default: fg's own grid); drawn on the latent
    grid and upsampled to an image-resolution fg, the same blob gets a smooth outline instead of cell steps."""
    B, _, h, w = fg.shape
    fh, fw = field_hw or (h, w)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    noise = F.avg_pool2d(torch.randn(B, 1, fh + 8, fw + 8, generator=gen), 9, stride=1)  # (B, 1, fh, fw)
    noise = noise / noise.flatten(1).std(dim=1).view(B, 1, 1, 1).clamp_min(1e-6)
    if (fh, fw) != (h, w):
        noise = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)   # (B, 1, h, w)
    m = torch.ones(B, 1, h, w)
    for b in range(B):
        where = fg[b, 0].cpu().nonzero()
        where = where if len(where) else torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
        cy, cx = where[torch.randint(len(where), (1,), generator=gen)][0].float()
        r = (min_r + (max_r - min_r) * torch.rand(1, generator=gen)) * min(h, w)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / r + 0.25 * noise[b, 0] < 1
        blob[int(cy), int(cx)] = True                              # never empty
        inside = blob & fg[b, 0].cpu()
        m[b, 0] = 1 - (inside if inside.any() else blob).float()
    return m.to(fg.device)


def soft_latent_mask(label, hw):
    """An image-resolution label (B, 1, S, S) in {0, 1} -> the latent mask m (B, 1, h, w), 1 = clean: each cell
    clean by the share of its pixels outside the lesion (area averaging). The lesion's area is kept exactly when
    S is a multiple of h, and a cell the outline crosses is changed in part, so the decoded change follows the
    drawn outline, not the latent grid's staircase."""
    return 1 - F.adaptive_avg_pool2d(label, hw)


def smooth_eta(d, sigma):
    """d (B, c, h, w) low-passed by a Gaussian of sigma latent cells, per channel (edge padding, so a constant
    field stays constant): removes the cell-to-cell texture of eta_pred and keeps its slow, region-wide part."""
    if sigma <= 0:
        return d
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=d.dtype, device=d.device) / sigma) ** 2)
    g = g / g.sum()
    c = d.shape[1]
    d = F.pad(d, (r, r, r, r), mode="replicate")
    d = F.conv2d(d, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)                      # along x
    return F.conv2d(d, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)                   # along y


def synthesise(z_n, m, C, eta_pred=None, n=None):
    """z_anom = z_n + C * (1 - m) * d, with d = eta_pred (the method) or n (the control), scaled to unit RMS
    inside the mask, so that C is the deviation's size in units of the (standardised) latent's std.
    Masking by (1 - m) keeps the label exact: nothing changes outside the region we call anomalous."""
    d = eta_pred if eta_pred is not None else n
    inside = (1 - m).expand_as(d)
    rms = ((d * inside) ** 2).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp_min(1)
    return z_n + C.view(-1, 1, 1, 1) * inside * d / rms.sqrt().clamp_min(1e-6).view(-1, 1, 1, 1)


def foreground(views, hw=None, frac=0.1):
    """Where the anatomy is, on a grid hw (default: the views' own): pixels brighter than frac of the image's max.
    At image resolution the grey level is first averaged over a window of 1/16 of the side, so that speckle and
    dark structures inside the anatomy (ultrasound, CSF) do not punch holes into it. (N, 1, h, w) bool."""
    hw = hw or views.shape[-2:]
    g = views.mean(1, keepdim=True)
    if tuple(hw) == tuple(views.shape[-2:]):
        k = max(3, views.shape[-1] // 16) // 2 * 2 + 1                 # odd window, 15 px at 224
        g = F.avg_pool2d(g, k, stride=1, padding=k // 2, count_include_pad=False)
    g = F.adaptive_avg_pool2d(g, hw)                                  # (N, 1, h, w)
    return g > frac * g.flatten(1).amax(1).view(-1, 1, 1, 1)


def sample_tissue(z_n, fg, m, gen):
    """DeCo-Diff's shuffled patches at synthesis: for each image, its own latent moved so that the tissue around a
    random foreground cell (fg (B, 1, h, w) bool, on the latent grid) lands on the region's centre. (B, c, h, w)"""
    B, _, h, w = z_n.shape
    out = torch.empty_like(z_n)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for b in range(B):
        region = (1 - m[b, 0]).cpu()
        area = region.sum().clamp_min(1e-6)
        cy, cx = (region * yy).sum() / area, (region * xx).sum() / area          # the region's centroid
        cells = fg[b, 0].cpu().nonzero()
        cells = cells if len(cells) else torch.tensor([[h // 2, w // 2]])
        sy, sx = cells[torch.randint(len(cells), (1,), generator=gen)][0].tolist()
        out[b] = torch.roll(z_n[b], shifts=(int(round(float(cy))) - sy, int(round(float(cx))) - sx), dims=(-2, -1))
    return out


def sample_synthesis(z_n, fg, C_range, mask="lesions", gen=None, t_min=0, source="noise", noise="gaussian"):
    """The random draws of one synthesis of a batch z_n (B, c, h, w): the anomaly's region, its size
    C ~ U(C_range), the noise n and the step t ~ U{t_min..T-1} of the masked forward. The learned anomaly and
    its control share them. fg (B, 1, S, S) bool: the anatomy at image resolution (foreground). The region:
      lesions  a smooth blob drawn at image resolution inside fg; the label is that blob, the latent mask m its
               area share per cell (soft_latent_mask)
      blobs    the same kind of blob drawn on the latent grid (its outline is the grid's staircase)
      patches  DeCo-Diff's square patches on the latent grid
    source "tissue": the masked forward that eta_theta reads puts tissue of the same image from elsewhere in the
    anatomy into the region (sample_tissue; DeCo-Diff's shuffled patches) instead of the Gaussian n ("n_eta");
    noise "surrogate" (with source "noise"): it puts z_n's own surrogate there (sample_surrogate, "n_eta"), as
    eta_theta trained with it reads. Either way the latent-noise control keeps the Gaussian n.
    Returns m (B, 1, h, w), 1 = clean, the label (B, 1, S, S), 1 = anomalous, C, n and t (and n_eta)."""
    B, (h, w), device = len(z_n), z_n.shape[-2:], z_n.device
    fg_latent = F.adaptive_avg_pool2d(fg.float(), (h, w)) > 0.5                    # (B, 1, h, w)
    C = (C_range[0] + (C_range[1] - C_range[0]) * torch.rand(B, generator=gen)).to(device)
    if mask == "lesions":
        label = 1 - sample_blob_mask(fg, gen, field_hw=(h, w))
        m = soft_latent_mask(label, (h, w))
    else:
        m = sample_blob_mask(fg_latent, gen) if mask == "blobs" else sample_patch_mask(B, h, w, gen, device)[0]
        label = F.interpolate(1 - m, size=fg.shape[-2:], mode="nearest")
    n = torch.randn(z_n.shape, generator=gen).to(device)
    t = torch.randint(t_min, T, (B,), generator=gen).to(device)
    draws = dict(m=m, label=label, C=C, n=n, t=t)
    if source == "tissue":                       # drawn last: the other draws stay those of source "noise"
        draws["n_eta"] = sample_tissue(z_n, fg_latent, m, gen)
    elif noise == "surrogate":                   # eta_theta trained on surrogates reads one; the control keeps n
        draws["n_eta"] = sample_surrogate(z_n, gen)
    return draws


def synthesise_latent(z_n, draws, eta=None, abar=None, grad=False, grey=None, grey_base=None, smooth=0.0):
    """z_anom = z_n + C (1 - m) eta_pred, eta_pred = eta_theta(x_t, t) one step from a masked forward of z_n whose
    mask is the anomaly's (the method); with eta None, z_n + C (1 - m) n (the latent-noise control). Returns
    z_anom and eta_pred (None for the control). grad=False: the detector's loss cannot reach eta_theta, since a
    generator trained against the detector learns the anomalies easiest to detect, not plausible ones.
    smooth: eta_pred low-passed by a Gaussian of that many latent cells first (smooth_eta; the control's n is not).
    grey: R(z) = E(grey(D(z))) (grey_round_trip) for grey-scale images in a colour latent space, and
    grey_base R(z_n) if it is at hand: see keep_grey."""
    m, C, n, t = draws["m"], draws["C"], draws["n"], draws["t"]
    if eta is None:
        z_anom, eta_pred = synthesise(z_n, m, C, n=n), None
    else:
        x_t, _ = masked_forward(z_n, m, t, draws.get("n_eta", n), abar)
        with torch.enable_grad() if grad else torch.no_grad():
            eta_pred = eta(x_t, t)
        z_anom = synthesise(z_n, m, C, eta_pred=smooth_eta(eta_pred, smooth))
    return (z_anom if grey is None else keep_grey(z_n, z_anom, m, grey, grey_base)), eta_pred


def decodes_colour(name):
    """Whether the VAE decodes three independent channels (TAEF2, the 3-channel MedVAEs), so that a latent change
    can tint a grey image; the 1-channel MedVAEs decode grey by construction."""
    return name == "taef2" or encode.MEDVAE_MODELS[name]["in_channels"] == 3


def is_grey(images, tol=1 / 255):
    """(N, 3, S, S): whether every pixel has R = G = B (to within a grey level)."""
    return bool((images.amax(1) - images.amin(1)).max() <= tol)


def grey_round_trip(vae, mean, std, batch_size=16):
    """R(z) = E(grey(D(z))) on standardised latents (z - mean) / std, in batches: a latent made grey by decoding it,
    averaging the channels and encoding again (deviation.synthesise_latent's `grey`)."""
    def R(z_n):
        outs = []
        for zb in z_n.split(batch_size):
            x = encode.vae_decode(vae, zb * std + mean)
            outs.append((encode.vae_encode(vae, x.mean(1, keepdim=True).expand_as(x)) - mean) / std)
        return torch.cat(outs)
    return R


def grey_for(grey, name, vae, images, mean, std):
    """The grey round trip R when it applies (grey "decode", grey-scale images, a VAE `name` that decodes colour),
    else None. Checkpoints from before train.py --grey existed synthesised without it: pass "off" for them."""
    if grey == "decode" and decodes_colour(name) and is_grey(images):
        return grey_round_trip(vae, mean, std)
    return None


def keep_grey(z_n, z_anom, m, grey, base=None):
    """A grey image's anomaly kept grey in a colour latent space (TAEF2 tints grey images where a deviation leaves
    the latents of grey images): the latent change is replaced by that of the anomaly's grey decoding,
        z_n + (1 - m) (R(z_anom) - R(z_n)),   R(z) = E(grey(D(z))).
    Taking the difference cancels the round trip's own error; masking by (1 - m) keeps the label exact. A linear
    projection that removes the latent directions of pure tints was tried first: it left ~85% of the colour."""
    return z_n + (1 - m) * (grey(z_anom) - (grey(z_n) if base is None else base))


# -----------------------------------------------------------------------------
# eta_theta: a small time-conditioned U-Net for the latent grid

def time_embedding(t, dim):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """eta_theta(x_t, t): (B, c, h, w), (B,) -> (B, c, h, w). Any h, w (padded to the U-Net's stride)."""

    def __init__(self, channels, width=32, mults=(1, 2, 4), blocks=1):
        super().__init__()
        self.width, self.stride = width, 2 ** (len(mults) - 1)
        t_dim = 4 * width
        self.t_mlp = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        chans, c = [width], width
        self.down = nn.ModuleList()
        for i, mult in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, width * mult, t_dim))
                c = width * mult
                chans.append(c)
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                chans.append(c)
        self.mid = ResBlock(c, c, t_dim)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + chans.pop(), width * mult, t_dim))
                c = width * mult
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(min(8, c), c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting no deviation
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t):
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        x = F.pad(x, (0, pw, 0, ph))                       # (B, c, h', w'), divisible by the stride
        temb = self.t_mlp(time_embedding(t, self.width))   # (B, 4 * width)
        x = self.conv_in(x)
        skips = [x]
        for layer in self.down:
            x = layer(x, temb) if isinstance(layer, ResBlock) else layer(x)
            skips.append(x)
        x = self.mid(x, temb)
        for layer in self.up:
            x = layer(torch.cat([x, skips.pop()], 1), temb) if isinstance(layer, ResBlock) else layer(x)
        return self.conv_out(F.silu(self.norm_out(x)))[..., :h, :w]


def build_unet(preset, channels):
    # channels-last weights: oneDNN's convolutions then keep every activation channels-last (a 1-channel input
    # cannot say which layout it is in), fp32 forward + backward on 2 CPU cores 240 -> 197 ms (docs/speed.md)
    return UNet(channels, **UNET_PRESETS[preset]).to(memory_format=torch.channels_last)
