"""
The frozen encoders: MedVAE (image -> latent z) and CLIP (image -> patch tokens; its text tower for the prompts is
mediclip.TextTower).

- MedVAE (Varma et al., "MedVAE: Efficient Automated Interpretation of Medical Images with Large-Scale
  Generalizable Autoencoders", 2025), through the real `medvae` package. We use the stage-1 2D latent and
  take the posterior *mode* (its mean), not a sample, so that the same image always gives the same z.
  Input normalisation is MedVAE's own 2D transform (medvae.utils.loaders.load_2d): per-image, per-channel
  min-max to [0, 1], then (x - 0.5) / 0.5, then channel averaging for 1-channel models.
- CLIP (Radford et al. 2021) through open_clip. As in MediCLIP (Zhang et al., MICCAI 2024) we take the
  patch tokens (CLS dropped) of residual blocks 12, 18, 24 of ViT-L-14 at 224 px, as (B, D, H, W).
  The forward stops after the deepest block needed. OpenAI's weights (the `openai` tag, the default) come
  from the hub repos that hold them today and are built with QuickGELU; where weights come from and how
  their files are read is weights.py.

Everything here is frozen: eval mode, requires_grad False, and the encode_* functions run under
torch.inference_mode (callers that feed the outputs to trainable modules clone them once).

    import encode
    clip = encode.load_clip("ViT-B-16", random_init=True)
    tokens = encode.CLIPTokens(clip, layers=(6, 9, 12))
    feats = encode.encode_tokens(tokens, images)          # list of (B, D, H, W)

    python encode.py --prefetch [--clip ViT-L-14 --pretrained openai --vae medvae_4_1_2d]   # fill the caches
"""
import argparse
import contextlib
import io
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastclip
import weightfiles
import weights as W
from taef2 import TAEF2
from weights import WeightsUnavailable  # noqa: F401  (callers catch encode.WeightsUnavailable)

# open_clip and medvae import timm's old module path; timm's notice about it is for their authors, not for users
warnings.filterwarnings("ignore", message="Importing from timm.models.layers is deprecated", category=FutureWarning)

# Architectures assumed for --random-init and --vae-weights (the hub brings each model's own config).
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
MEDVAE_LORA = ("medvae_4_3_2d", "medvae_8_4_2d")  # medvae's build_model injects LoRA (r=4) into these
MEDVAE_OPTIONAL = ("channel_ds.", "channel_proj.")  # MedVAE's stage-2 head: loaded if present, never used here
RANDOM_INIT_SEED = 0  # random backbones are drawn from a fixed seed, so train and evaluate see the same one


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def freeze_vae(model):
    """freeze, with channels-last weights: oneDNN's convolutions run faster so (2 CPU cores, 224 px: medvae_4_1_2d
    encode bf16 0.43 -> 0.20 s / image, fp32 4 %; TAEF2 bf16 2.7x, fp32 1.3x), the latents the same to rounding."""
    return freeze(model).to(memory_format=torch.channels_last)


@contextlib.contextmanager
def fixed_seed(seed=RANDOM_INIT_SEED):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -----------------------------------------------------------------------------
# CLIP

def clip_names():
    """open_clip's names that this project can use: ViTs with open_clip's built-in text tower."""
    import open_clip
    return [n for n in open_clip.list_models()
            if "vision_cfg" in (cfg := open_clip.get_model_config(n) or {}) and "timm_model_name" not in
            cfg["vision_cfg"] and not isinstance(cfg["vision_cfg"].get("layers"), (list, tuple))
            and "hf_model_name" not in cfg.get("text_cfg", {}) and "multimodal_cfg" not in cfg]


def check_clip_name(name):
    if name not in clip_names():
        raise ValueError(f"unknown or unsupported CLIP model {name!r} (a ViT with open_clip's own text tower is "
                         f"needed); valid: {', '.join(clip_names())}")


def clip_activation(model):
    """'quickgelu' or 'gelu': the MLP activation the model was built with (every OpenAI CLIP needs QuickGELU)."""
    from open_clip.transformer import QuickGELU
    return "quickgelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu"


def create_clip(name, quickgelu, empty=False):
    """open_clip's `name`, randomly initialised; empty=True builds it on the meta device instead, for weights that
    a file then supplies: no random init to overwrite (ViT-L-14: ~5 s on 2 cores) and no second copy in memory."""
    import open_clip
    if not empty:
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quickgelu)
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quickgelu, device="meta")


def restore_causal_masks(model):
    """The one tensor that no weights file holds, after they were assigned to a model built empty: open_clip's
    causal text mask (its build_causal_mask: -inf above the diagonal). False if anything else is left empty."""
    for module in model.modules():
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta and name == "attn_mask" and b.dim() == 2 and b.shape[0] == b.shape[1]:
                module.register_buffer(name, torch.full(b.shape, float("-inf"), dtype=b.dtype).triu_(1),
                                       persistent=False)
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def clip_from_file(name, path, quickgelu=None):
    """open_clip `name` with the weights of `path` (safetensors, torch state dict or OpenAI TorchScript). The
    activation: as asked (quickgelu True/False), else QuickGELU when the file is OpenAI's or the name says so."""
    sd, info = weightfiles.read_state_dict(path, "--clip-weights")
    if quickgelu is None:
        quickgelu = name.endswith("-quickgelu") or bool(info["openai"])
        if info["openai"] and not name.endswith("-quickgelu"):
            print(f"{path}: OpenAI's CLIP weights ({info['format']}): built {name} with QuickGELU")
        elif info["openai"] is None and not name.endswith("-quickgelu"):
            alt = f"--clip {name}-quickgelu" if f"{name}-quickgelu" in clip_names() else \
                  "an open_clip_config.json with quick_gelu beside the file"
            print(f"warning: {path}: the file does not say whether it is OpenAI's CLIP (QuickGELU) or not; built "
                  f"{name} with GELU. If it holds OpenAI's weights, pass {alt}")
    sd = {k: v for k, v in sd.items() if k not in weightfiles.OPENAI_EXTRA_KEYS}
    model = create_clip(name, quickgelu, empty=True)
    ignored = weightfiles.load_exact(model, sd, path, assign=True)   # the file's tensors become the weights (as fp32)
    if not restore_causal_masks(model):  # a buffer this open_clip makes that we cannot rebuild: the slow way
        model = create_clip(name, quickgelu)
        weightfiles.load_exact(model, sd, path)
    if ignored:
        print(f"{path}: ignored {weightfiles.summarise_ignored(ignored)}")
    return model


def load_clip(name="ViT-L-14", pretrained="openai", weights=None, random_init=False):
    """A frozen open_clip model: from a local weights file (it wins over --random-init), random weights (only
    when asked), or the pretrained tag's file (clip_weights_file)."""
    check_clip_name(name)
    if weights:
        return freeze(clip_from_file(name, weights))
    if random_init:  # the architecture the tag would load: OpenAI's tags mean QuickGELU
        with fixed_seed():
            return freeze(create_clip(name, quickgelu=pretrained == "openai" or name.endswith("-quickgelu")))
    path, quickgelu = W.clip_weights_file(name, pretrained)
    return freeze(clip_from_file(name, path, quickgelu))


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
    """Patch tokens of the residual blocks `layers` (counted from 1) of a CLIP ViT, as (B, D, H, W).

    linear_dtype (bf16, only for forwards under bf16 autocast): the blocks run from fastclip's copy, linear weights
    cast once and QuickGELU folded; the CLIP stays as loaded (+0.6 GiB for ViT-L-14)."""

    def __init__(self, clip, layers=(12, 18, 24), linear_dtype=None):
        super().__init__()
        self.visual = clip.visual
        n = len(self.visual.transformer.resblocks)
        if not layers or min(layers) < 1 or max(layers) > n:
            raise ValueError(f"--layers {list(layers)} out of range: this CLIP has blocks 1..{n}")
        self.layers = tuple(layers)
        self.blocks = self.visual.transformer.resblocks[:max(self.layers)]
        if linear_dtype is not None:
            self.blocks = fastclip.fast_copy(self.blocks, linear_dtype)
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
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.layers:
                out[i] = x if self.batch_first else x.transpose(0, 1)
        # drop CLS, back to a grid: (B, D, H, W) with the token dim last in memory (channels-last), so that the
        # adapters' LayerNorm over D reads it without a copy
        return [out[i][:, 1:].reshape(B, H, W, D).permute(0, 3, 1, 2) for i in self.layers]


@torch.inference_mode()
def encode_tokens(tokens_model, images, clip, batch_size=16, autocast=contextlib.nullcontext):
    """images (N, 3, S, S) in [0, 1] -> list over layers of (N, D, H, W) float32, batched."""
    outs = []
    for i in range(0, len(images), batch_size):
        x = clip_normalise(images[i:i + batch_size], clip)
        with autocast():
            outs.append([t.float() for t in tokens_model(x)])
    return [torch.cat(parts) for parts in zip(*outs)]


# -----------------------------------------------------------------------------
# MedVAE

def medvae_ddconfig(name):
    a = MEDVAE_MODELS[name]
    return dict(double_z=True, z_channels=a["z_channels"], resolution=256, in_channels=a["in_channels"],
                out_ch=a["in_channels"], ch=a["ch"], ch_mult=list(a["ch_mult"]), num_res_blocks=2,
                attn_resolutions=[], dropout=0.0)


def build_medvae(name, ddconfig, embed_dim):
    """The medvae package's 2D autoencoder, as its build_model makes it (with LoRA where it injects it)."""
    from medvae.models import AutoencoderKL_2D
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its architecture while building
        model = AutoencoderKL_2D(ddconfig=dict(ddconfig), embed_dim=embed_dim)
        if name in MEDVAE_LORA:
            from medvae.utils.lora import inject_trainable_lora_extended
            inject_trainable_lora_extended(model, {"ResnetBlock", "AttnBlock"}, r=4)
    return model


def read_medvae_config(path):
    """(ddconfig, embed_dim) from a MedVAE yaml: top level, or under model.params (the LoRA models' files)."""
    import yaml
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        cfg = cfg["model"]["params"] if "model" in cfg else cfg
        return cfg["ddconfig"], int(cfg["embed_dim"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise WeightsUnavailable(f"{path}: not a MedVAE config ({type(e).__name__}: {e})".splitlines()[0]) from None


def load_medvae(name="medvae_4_1_2d", weights=None, random_init=False):
    """A frozen MedVAE 2D autoencoder: a local checkpoint (wins over --random-init), random weights, or the hub
    (cache first). The hub and a file take the same path: exactly the autoencoder's keys are loaded, what the
    file holds besides (LDM's loss.*, Lightning's extras) is named and ignored, anything missing fails."""
    if name not in MEDVAE_MODELS:
        raise ValueError(f"unknown MedVAE model {name!r}; valid: {', '.join(MEDVAE_MODELS)}")
    if weights:
        ckpt, (ddconfig, embed_dim) = weights, (medvae_ddconfig(name), MEDVAE_MODELS[name]["z_channels"])
    elif random_init:
        with fixed_seed():
            return freeze_vae(build_medvae(name, medvae_ddconfig(name), MEDVAE_MODELS[name]["z_channels"]))
    else:
        config, ckpt = W.vae_files(name)                  # the package's yaml and checkpoint, from the hub
        ddconfig, embed_dim = read_medvae_config(config)
    model = build_medvae(name, ddconfig, embed_dim)
    sd, info = weightfiles.read_state_dict(ckpt, "--vae-weights")
    ignored = weightfiles.load_exact(model, sd, ckpt, optional=MEDVAE_OPTIONAL)
    absent = [k for k in model.state_dict() if k not in sd]
    notes = [f"ignored {weightfiles.summarise_ignored(ignored)}"] * bool(ignored) + \
            [f"absent (unused here) {weightfiles.summarise_ignored(absent)}"] * bool(absent) + \
            [f"skipped pickled objects {', '.join(info['skipped_objects'])}"] * bool(info["skipped_objects"])
    if notes:
        print(f"MedVAE {name} from {ckpt}: " + "; ".join(notes))
    return freeze_vae(model)


def medvae_normalise(x, in_channels):
    """(B, 3, S, S) in [0, 1] -> MedVAE's 2D input: per-image, per-channel min-max, to [-1, 1], channel mean."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)  # a constant channel becomes 0, as in monai's ScaleIntensity
    x = (x - 0.5) / 0.5
    return x.mean(dim=1, keepdim=True) if in_channels == 1 else x


def load_taef2(weights=None, random_init=False):
    """A frozen TAEF2: from a folder of its two files (wins over --random-init), random, or downloaded."""
    if random_init and not weights:
        with fixed_seed():
            return freeze_vae(TAEF2())
    model = TAEF2()
    for part, path in zip((model.encoder, model.decoder), W.taef2_files(weights)):
        weightfiles.load_exact(part, weightfiles.read_state_dict(path, "--vae-weights")[0], path)
    return freeze_vae(model)


# -----------------------------------------------------------------------------
# either latent space

VAE_NAMES = (*MEDVAE_MODELS, "taef2")


def load_vae(name, weights=None, random_init=False):
    if name == "taef2":
        return load_taef2(weights, random_init)
    return load_medvae(name, weights, random_init)


def vae_encode(vae, x):
    """(B, 3, S, S) in [0, 1] -> the latent: TAEF2's, or MedVAE's stage-1 posterior mode after its normalisation.
    The activations follow the weights' layout (channels-last, freeze_vae); the latent comes back contiguous."""
    if isinstance(vae, TAEF2):
        return vae.encode(x).contiguous()
    return vae.encode(medvae_normalise(x, vae.encoder.conv_in.in_channels)).mode().contiguous()


def vae_decode(vae, z):
    """latent -> (B, 3, S, S) in [0, 1], to look at (MedVAE's image is its min-max normalised input's)."""
    if isinstance(vae, TAEF2):
        return vae.decode(z).contiguous()
    x = (vae.decode(z).contiguous() * 0.5 + 0.5).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.inference_mode()
def encode_latents(vae, images, batch_size=None, autocast=contextlib.nullcontext):
    """images (N, 3, S, S) in [0, 1] -> latents z (N, c, S/f, S/f) float32, batched.

    One image at a time on the CPU: the VAE's full-resolution activations (128 channels at 224 px) then stay in
    the caches; medvae_4_1_2d on 2 cores, 16 images in a fresh process: fp32 0.86 s / image at batch 1 against
    0.94 s at 4, bf16 0.20 against 0.25 s (the same latents to 1e-7). A GPU wants batches."""
    batch_size = batch_size or (1 if images.device.type == "cpu" else 16)
    outs = []
    for i in range(0, len(images), batch_size):
        with autocast():
            outs.append(vae_encode(vae, images[i:i + batch_size]).float())
    return torch.cat(outs)


# -----------------------------------------------------------------------------
# prefetch: for clusters whose compute nodes are offline

def main(argv=None):
    p = argparse.ArgumentParser(description="Download every file the frozen encoders need into the caches "
                                "(HF_HOME / HF_HUB_CACHE), so that later runs work with HF_HUB_OFFLINE=1.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prefetch", action="store_true", required=True, help="download and print path and sha256")
    p.add_argument("--clip", default="ViT-L-14", help="open_clip model name, as train.py --clip")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag, as train.py --pretrained")
    p.add_argument("--vae", default="medvae_4_1_2d", help="MedVAE model or taef2, as train.py --vae")
    args = p.parse_args(argv)
    check_clip_name(args.clip)
    paths = [W.clip_weights_file(args.clip, args.pretrained)[0]] + W.vae_files(args.vae)
    for path in paths:
        print(f"{W.sha256(path)}  {os.path.getsize(path) / 2**20:9.1f} MiB  {path}")
    print(f"cache: {W.hub_cache()}; on the offline nodes share it (HF_HOME or HF_HUB_CACHE) and set HF_HUB_OFFLINE=1")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (WeightsUnavailable, ValueError) as e:
        sys.exit(f"error: {e}")
