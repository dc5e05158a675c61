"""
Where the frozen encoders' weights come from: the hub, OpenAI's CLIP today, TAEF2's pinned files.

- The Hugging Face hub, through huggingface_hub, so that everything it honours works here too: HF_ENDPOINT
  (a mirror), HF_HUB_OFFLINE (use the cache only), HF_HOME / HF_HUB_CACHE (where the cache is), HF_TOKEN and
  HTTPS_PROXY. Before a download we probe the endpoint it will use (not huggingface.co: a mirror may be all a
  user can reach), so an offline machine fails in seconds, not after the client's ~25 s of retries; with a proxy
  configured the proxy decides and we do not probe. Every failure is one line: offline, HTTP status and URL,
  interrupted download, disk full.
- OpenAI's CLIP weights. open_clip 2.24 (pinned by medvae) fetches the `openai` tags from
  openaipublic.azureedge.net, which answers 404 since late 2025. The same weights are published as open_clip
  state dicts in the hub repos of OPENAI_HUB (open_clip >= 2.29 reads them from there) and, like every OpenAI
  CLIP, need QuickGELU. A legacy ~/.cache/clip/<name>.pt that a user already has is still used.
- TAEF2, the tiny autoencoder that stands in for MedVAE offline: from the GitHub repository that publishes it,
  pinned to a commit and checked against its sha256.
How a file, once here, is read without running anything in it is weightfiles.py.

    import weights
    path, quickgelu = weights.clip_weights_file("ViT-B-16", "openai")   # downloaded once, then from the cache
    config, ckpt = weights.vae_files("medvae_4_1_2d")
"""
import errno
import hashlib
import os
import socket
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

import torch

MEDVAE_REPO = "stanfordmimi/MedVAE"
# open_clip's `openai` tags -> the hub repos that hold the same weights today (as in open_clip >= 2.29's registry)
OPENAI_HUB = {
    "RN50": "timm/resnet50_clip.openai", "RN101": "timm/resnet101_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai", "RN50x16": "timm/resnet50x16_clip.openai",
    "RN50x64": "timm/resnet50x64_clip.openai",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai", "ViT-B-16": "timm/vit_base_patch16_clip_224.openai",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai", "ViT-L-14-336": "timm/vit_large_patch14_clip_336.openai",
}
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # safetensors first: no pickle


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found locally, downloaded or read; the message is one line."""


# -----------------------------------------------------------------------------
# the hub: cache first, a fast probe, one-line failures

def one_line(e):
    """An exception's message on one line, at most 160 characters."""
    return " ".join(str(e).split())[:160]


def hub_endpoint():
    from huggingface_hub import constants
    return constants.ENDPOINT.rstrip("/")


def hub_cache():
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline():
    from huggingface_hub import constants
    return constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE


def probe(url, timeout=3.0):
    """None if `url`'s host accepts a TCP connection, or a proxy is configured for it (the proxy decides);
    otherwise why not, in a few words."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    proxies = getproxies()
    if (proxies.get(u.scheme) or proxies.get("all")) and not proxy_bypass(u.hostname):
        return None
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"no route to {u.scheme}://{u.hostname}:{port} ({e.strerror or type(e).__name__})"


def ways_out(flag):
    return (f"ways out: run `python encode.py --prefetch` where the hub (or a mirror, HF_ENDPOINT) is reachable "
            f"and share the HF cache (HF_HOME), pass a local file with {flag}, or --random-init for a smoke run")


def explain_download_error(e, url):
    """One line for a failed download: HTTP status and URL, interrupted, disk full, network."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, \
        RepositoryNotFoundError
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status == 403:
        return f"HTTP {status} for {url}: gated or forbidden; accept the licence on the model page and log in " \
               f"(`hf auth login` or HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError) or status == 401:
        return f"HTTP {status} for {url}: repository not found, or private (log in: `hf auth login` or HF_TOKEN)"
    if isinstance(e, RemoteEntryNotFoundError) or status == 404:
        return f"HTTP 404 for {url}: the file is not there (moved or removed)"
    if isinstance(e, HfHubHTTPError) and status:
        return f"HTTP {status} for {url}: " + ("server error, try again later" if status >= 500 else "refused")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while downloading {url} into {hub_cache()}: free space or set HF_HUB_CACHE to a larger disk"
    if "Consistency check failed" in str(e) or type(e).__name__ in ("RemoteProtocolError", "ReadError"):
        return f"download of {url} was interrupted ({type(e).__name__}); run again, it resumes from the cache"
    return f"download of {url} failed ({type(e).__name__}: {one_line(e)})"


def hub_file(repo, filenames, flag):
    """The first of `filenames` that `repo` has: from the local HF cache, else downloaded into it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError
    filenames = [filenames] if isinstance(filenames, str) else list(filenames)
    for f in filenames:
        try:
            return hf_hub_download(repo, f, local_files_only=True)
        except Exception:
            pass
    what = f"{repo}/{' or '.join(filenames)}"
    if hub_offline():
        raise WeightsUnavailable(f"{what}: not in the HF cache ({hub_cache()}) and HF_HUB_OFFLINE is set; {ways_out(flag)}")
    why = probe(hub_endpoint())
    if why:
        raise WeightsUnavailable(f"{what}: not in the HF cache ({hub_cache()}) and {why}: offline? {ways_out(flag)}")
    for i, f in enumerate(filenames):
        url = hf_hub_url(repo, f)
        try:
            get_hf_file_metadata(url)  # one HEAD without retries: a refusal or a 5xx is said in a second, not ~25 s
            return hf_hub_download(repo, f)
        except EntryNotFoundError as e:
            if i == len(filenames) - 1:
                raise WeightsUnavailable(f"{repo}: none of {', '.join(filenames)} ({explain_download_error(e, url)})")
        except Exception as e:
            raise WeightsUnavailable(explain_download_error(e, url)) from None


def legacy_openai_file(name):
    """OpenAI's TorchScript file as open_clip <= 2.28 cached it (~/.cache/clip/<name>.pt), if it is there."""
    import open_clip
    url = (open_clip.get_pretrained_cfg(name.replace("-quickgelu", ""), "openai") or {}).get("url", "")
    path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)) if url else ""
    return path if path and os.path.isfile(path) else None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# which files each backbone needs: fetched (or found) here, built in encode.py

def clip_weights_file(name, pretrained):
    """The local file of an open_clip pretrained tag (downloaded into its cache if need be), and whether the
    weights need QuickGELU: `openai` from the hub repos that hold OpenAI's weights today (or a legacy
    ~/.cache/clip file), other hub tags from the hub, URL tags through open_clip's own download."""
    import open_clip
    base = name.replace("-quickgelu", "")
    cfg = open_clip.get_pretrained_cfg(name, pretrained) or open_clip.get_pretrained_cfg(base, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; valid: {', '.join(tags)}")
    if pretrained == "openai":
        return legacy_openai_file(name) or hub_file(OPENAI_HUB[base], OPEN_CLIP_FILES, "--clip-weights"), True
    quickgelu = name.endswith("-quickgelu")
    if cfg.get("hf_hub"):
        repo, filename = cfg["hf_hub"].rstrip("/"), None
        if repo.count("/") > 1:
            repo, filename = repo.rsplit("/", 1)
        return hub_file(repo, [filename] if filename else OPEN_CLIP_FILES, "--clip-weights"), quickgelu
    url = cfg["url"]  # GitHub releases and the like: open_clip's own download and cache (~/.cache/clip)
    from open_clip.pretrained import download_pretrained_from_url
    cached = os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
    why = None if cached else probe(url)
    if why:
        raise WeightsUnavailable(f"CLIP {name} ({pretrained}): not in ~/.cache/clip and {why}: offline? "
                                 f"{ways_out('--clip-weights')}")
    try:
        return download_pretrained_from_url(url), quickgelu
    except Exception as e:
        raise WeightsUnavailable(f"CLIP {name} ({pretrained}) from {url}: {type(e).__name__}: "
                                 f"{one_line(e)}") from None


TAEF2_FILES = {  # madebyollin/taesd (MIT) publishes it in its GitHub repository, not on the HF hub: pinned here
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
TAEF2_URL = "https://raw.githubusercontent.com/madebyollin/taesd/5cccb12dc72074a4be35680c3b108548a7c69978/{}"


def taef2_files(weights=None):
    """Paths of TAEF2's two files: in the folder `weights`, or downloaded once (pinned, sha256-checked) into
    torch's hub cache (TORCH_HOME)."""
    if weights:
        paths = [os.path.join(weights, f) for f in TAEF2_FILES]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise WeightsUnavailable(f"--vae-weights {weights}: TAEF2 needs a folder with {' and '.join(TAEF2_FILES)}"
                                     f"; missing {', '.join(missing)}")
        return paths
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", "taef2")
    paths = []
    for f, sha in TAEF2_FILES.items():
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            why = probe(TAEF2_URL.format(f))
            if why:
                raise WeightsUnavailable(f"TAEF2 {f}: not in {folder} and {why}: offline? {ways_out('--vae-weights')}")
            os.makedirs(folder, exist_ok=True)
            try:
                torch.hub.download_url_to_file(TAEF2_URL.format(f), path, hash_prefix=sha, progress=False)
            except Exception as e:
                raise WeightsUnavailable(f"TAEF2 {f} from {TAEF2_URL.format(f)}: {type(e).__name__}: "
                                         f"{one_line(e)}") from None
        paths.append(path)
    return paths


def vae_files(name):
    """The files of a VAE: TAEF2's two, or the medvae package's yaml and checkpoint (its FILE_DICT_ASSOCIATIONS)."""
    if name == "taef2":
        return taef2_files()
    from medvae.utils.factory import FILE_DICT_ASSOCIATIONS
    if name not in FILE_DICT_ASSOCIATIONS:
        raise ValueError(f"{name} has no published weights (use --random-init); published: "
                         f"{', '.join(FILE_DICT_ASSOCIATIONS)}")
    return [hub_file(MEDVAE_REPO, f, "--vae-weights") for f in FILE_DICT_ASSOCIATIONS[name].values()]
