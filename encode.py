"""
The frozen encoders: MedVAE (image -> latent z) and CLIP (image -> patch tokens; text tower for prompts).

- MedVAE (Varma et al., "MedVAE: Efficient Automated Interpretation of Medical Images with Large-Scale
  Generalizable Autoencoders", 2025), through the real `medvae` package. We use the stage-1 2D latent and
  take the posterior *mode* (its mean), not a sample, so that the same image always gives the same z.
  Input normalisation is MedVAE's own 2D transform (medvae.utils.loaders.load_2d): per-image, per-channel
  min-max to [0, 1], then (x - 0.5) / 0.5, then channel averaging for 1-channel models.
- CLIP (Radford et al. 2021) through open_clip. As in MediCLIP (Zhang et al., MICCAI 2024) we take the
  patch tokens (CLS dropped) of residual blocks 12, 18, 24 of ViT-L-14 at 224 px, as (B, D, H, W).
  The forward stops after the deepest block needed.

Everything here is frozen: eval mode, requires_grad False, and the encode_* functions run under
torch.inference_mode (callers that feed the outputs to trainable modules clone them once).

    import encode
    clip = encode.load_clip("ViT-B-16", random_init=True)
    tokens = encode.CLIPTokens(clip, layers=(6, 9, 12))
    feats = encode.encode_tokens(tokens, images)          # list of (B, D, H, W)
"""
import contextlib
import io
import os
import socket
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

HF_HOST = "huggingface.co"
MEDVAE_REPO = "stanfordmimi/MedVAE"

# Architectures assumed for --random-init (real weights bring their own config from the hub).
# MedVAE fine-tunes the KL autoencoders of Latent Diffusion (Rombach et al. 2022): kl-f4 is ch 128,
# ch_mult (1, 2, 4), 2 res blocks; kl-f8 adds a level. Latent channels come from the model name, and
# 1-channel models take 1-channel input (MedVAE averages the channels of their input).
# "medvae_tiny_2d" is a test-sized model with the same structure; it has no real weights.
MEDVAE_MODELS = {
    "medvae_4_1_2d": dict(ch=128, ch_mult=(1, 2, 4), z_channels=1, in_channels=1),
    "medvae_4_3_2d": dict(ch=128, ch_mult=(1, 2, 4), z_channels=3, in_channels=3),
    "medvae_4_4_2d": dict(ch=128, ch_mult=(1, 2, 4), z_channels=4, in_channels=3),
    "medvae_8_1_2d": dict(ch=128, ch_mult=(1, 2, 4, 4), z_channels=1, in_channels=1),
    "medvae_8_4_2d": dict(ch=128, ch_mult=(1, 2, 4, 4), z_channels=4, in_channels=3),
    "medvae_tiny_2d": dict(ch=32, ch_mult=(1, 1, 2), z_channels=1, in_channels=1),
}
RANDOM_INIT_SEED = 0  # random backbones are drawn from a fixed seed, so train and evaluate see the same one


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


# -----------------------------------------------------------------------------
# fail fast when offline

def check_online(host=HF_HOST, timeout=3.0):
    """True if `host` answers on 443 within `timeout` s (hub clients otherwise retry for ~30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def ways_out(what, flag):
    return (f"{what}: not in the local cache and the download is not possible here (offline?). Ways out: "
            f"run once with internet to populate the cache (then HF_HUB_OFFLINE=1 works), pass a local "
            f"file with {flag} FILE, or use --random-init for a smoke run with random weights")


def hub_file(repo, filename, flag):
    """A file from the Hugging Face hub: the local cache first, then a download if the hub is reachable."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        pass
    if not check_online():
        raise WeightsUnavailable(ways_out(f"{repo}/{filename}", flag))
    return hf_hub_download(repo, filename)


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def fixed_seed(seed=RANDOM_INIT_SEED):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_state_file(path, flag):
    """A plain state dict saved with torch.save, loaded safely (weights_only)."""
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{path}: no such weights file ({flag})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailable(f"{path}: not a readable weights file ({type(e).__name__}: {e})".split("\n")[0])
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise WeightsUnavailable(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_strict(model, sd, path):
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsUnavailable(f"{path}: does not fit this architecture ({str(e).splitlines()[-1].strip()[:160]})")
    if missing or unexpected:
        raise WeightsUnavailable(f"{path}: does not fit this architecture "
                                 f"({len(missing)} missing keys e.g. {missing[:2]}, "
                                 f"{len(unexpected)} unexpected e.g. {unexpected[:2]})")


# -----------------------------------------------------------------------------
# CLIP

def clip_names():
    import open_clip
    return open_clip.list_models()


def load_clip(name="ViT-L-14", pretrained="openai", weights=None, random_init=False):
    """A frozen open_clip model: pretrained tag, a local state-dict file, or (explicitly) random weights."""
    import open_clip
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {name!r}; valid: {', '.join(open_clip.list_models())}")
    if random_init:
        with fixed_seed():
            model = open_clip.create_model(name, pretrained=None)
    elif weights:
        model = open_clip.create_model(name, pretrained=None)
        load_strict(model, load_state_file(weights, "--clip-weights"), weights)
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; valid: {', '.join(tags)}")
        url = cfg.get("url", "")
        if not url:  # a hub tag: resolve the file through the HF cache ourselves, then load it
            model_id, filename = os.path.split(cfg["hf_hub"])
            path = hub_file(model_id, filename or "open_clip_pytorch_model.bin", "--clip-weights")
            return freeze(open_clip.create_model(name, pretrained=path))
        cached = os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
        if not cached and not check_online(urlparse(url).netloc):
            raise WeightsUnavailable(ways_out(f"CLIP {name} ({pretrained})", "--clip-weights"))
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as e:  # a broken or interrupted download
            raise WeightsUnavailable(ways_out(f"CLIP {name} ({pretrained}): {type(e).__name__}", "--clip-weights"))
    return freeze(model)


def clip_normalise(x, clip):
    """(B, 3, S, S) in [0, 1] -> CLIP's input normalisation at its native resolution."""
    v = clip.visual
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = torch.tensor(getattr(v, "image_mean", None) or OPENAI_DATASET_MEAN, device=x.device)
    std = torch.tensor(getattr(v, "image_std", None) or OPENAI_DATASET_STD, device=x.device)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class CLIPTokens(nn.Module):
    """Patch tokens of the residual blocks `layers` (counted from 1) of a CLIP ViT, as (B, D, H, W)."""

    def __init__(self, clip, layers=(12, 18, 24)):
        super().__init__()
        self.visual = clip.visual
        n = len(self.visual.transformer.resblocks)
        if not layers or min(layers) < 1 or max(layers) > n:
            raise ValueError(f"--layers {list(layers)} out of range: this CLIP has blocks 1..{n}")
        self.layers = tuple(layers)
        # open_clip 2.x blocks take (L, B, D); 3.x blocks take (B, L, D)
        self.batch_first = getattr(self.visual.transformer, "batch_first", False)

    @property
    def dim(self):
        return self.visual.transformer.width

    def forward(self, x):
        v = self.visual
        x = v.conv1(x)                                   # (B, D, H, W)
        B, D, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)                 # (B, HW, D)
        cls = v.class_embedding.to(x.dtype).view(1, 1, D).expand(B, 1, D)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+HW, D)
        x = v.ln_pre(x)                                  # patch dropout is the identity in eval mode
        if not self.batch_first:
            x = x.transpose(0, 1)                        # (1+HW, B, D)
        out = {}
        for i, block in enumerate(v.transformer.resblocks[:max(self.layers)], start=1):
            x = block(x)
            if i in self.layers:
                out[i] = x if self.batch_first else x.transpose(0, 1)
        # drop CLS, back to a grid
        return [out[i][:, 1:].transpose(1, 2).reshape(B, D, H, W) for i in self.layers]


@torch.inference_mode()
def encode_tokens(tokens_model, images, clip, batch_size=16, autocast=contextlib.nullcontext):
    """images (N, 3, S, S) in [0, 1] -> list over layers of (N, D, H, W) float32, batched."""
    outs = []
    for i in range(0, len(images), batch_size):
        x = clip_normalise(images[i:i + batch_size], clip)
        with autocast():
            outs.append([t.float() for t in tokens_model(x)])
    return [torch.cat(parts) for parts in zip(*outs)]


class TextTower(nn.Module):
    """CLIP's frozen text transformer fed with token *embeddings*, so that prompt contexts can be learned.

    With CLIP's causal mask, tokens after the end-of-text (EOT) token cannot change its features, so the
    sequence is cut after the longest prompt's EOT: exact, and several times cheaper than 77 tokens.
    """

    def __init__(self, clip):
        super().__init__()
        if not hasattr(clip, "token_embedding"):
            raise ValueError("only CLIP models with open_clip's built-in text tower are supported")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.batch_first = getattr(clip.transformer, "batch_first", False)

    def forward(self, x, eot):
        """x (N, L, W) prompt embeddings, eot (N,) index of each EOT token -> (N, E) text features."""
        L = int(eot.max()) + 1
        x = x[:, :L] + self.positional_embedding[:L].to(x.dtype)
        mask = self.attn_mask[:L, :L] if self.attn_mask is not None else None
        x = x if self.batch_first else x.transpose(0, 1)  # (L, N, W) for open_clip 2.x
        x = self.transformer(x, attn_mask=mask)
        x = x if self.batch_first else x.transpose(0, 1)  # (N, L, W)
        x = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]  # (N, W)
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Module) else x @ proj


# -----------------------------------------------------------------------------
# MedVAE

def medvae_ddconfig(name):
    a = MEDVAE_MODELS[name]
    return dict(double_z=True, z_channels=a["z_channels"], resolution=256, in_channels=a["in_channels"],
                out_ch=a["in_channels"], ch=a["ch"], ch_mult=list(a["ch_mult"]), num_res_blocks=2,
                attn_resolutions=[], dropout=0.0)


def build_medvae_random(name):
    """The medvae package's 2D autoencoder with the architecture of MEDVAE_MODELS[name], random weights."""
    from medvae.models import AutoencoderKL_2D
    return AutoencoderKL_2D(ddconfig=medvae_ddconfig(name), embed_dim=MEDVAE_MODELS[name]["z_channels"])


def load_medvae(name="medvae_4_1_2d", weights=None, random_init=False):
    """A frozen MedVAE 2D autoencoder: from the hub (cache first), a local checkpoint, or random weights."""
    if name not in MEDVAE_MODELS:
        raise ValueError(f"unknown MedVAE model {name!r}; valid: {', '.join(MEDVAE_MODELS)}")
    quiet = contextlib.redirect_stdout(io.StringIO())  # the package prints its architecture while building
    if random_init:
        with fixed_seed(), quiet:
            model = build_medvae_random(name)
    elif weights:
        with quiet:
            model = build_medvae_random(name)
        load_strict(model, load_state_file(weights, "--vae-weights"), weights)
    else:
        from medvae.utils.factory import FILE_DICT_ASSOCIATIONS, build_model
        if name not in FILE_DICT_ASSOCIATIONS:
            raise ValueError(f"{name} has no published weights; use --random-init")
        files = FILE_DICT_ASSOCIATIONS[name]
        config = hub_file(MEDVAE_REPO, files["config"], "--vae-weights")
        ckpt = hub_file(MEDVAE_REPO, files["ckpt"], "--vae-weights")
        with quiet:
            model = build_model(name, config, ckpt)  # the package's own build path
    return freeze(model)


def medvae_normalise(x, in_channels):
    """(B, 3, S, S) in [0, 1] -> MedVAE's 2D input: per-image, per-channel min-max, to [-1, 1], channel mean."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)  # a constant channel becomes 0, as in monai's ScaleIntensity
    x = (x - 0.5) / 0.5
    return x.mean(dim=1, keepdim=True) if in_channels == 1 else x


@torch.inference_mode()
def encode_latents(vae, images, batch_size=4, autocast=contextlib.nullcontext):
    """images (N, 3, S, S) in [0, 1] -> stage-1 posterior mode z (N, c, S/f, S/f) float32, batched."""
    in_channels = vae.encoder.conv_in.in_channels
    outs = []
    for i in range(0, len(images), batch_size):
        x = medvae_normalise(images[i:i + batch_size], in_channels)
        with autocast():
            outs.append(vae.encode(x).mode().float())
    return torch.cat(outs)
