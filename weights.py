"""
Where the frozen encoders' weights come from, and how their files are read without running anything in them.

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
- Readers: safetensors, torch state dicts (weights_only), OpenAI's TorchScript archives (their tensors only, read
  with an unpickler that builds tensors and nothing else), and Lightning checkpoints, whose pickled extras
  (hyper-parameters, callbacks, paths) are replaced by inert stand-ins so that weights_only loading accepts them.

    import weights
    path, quickgelu = weights.clip_weights_file("ViT-B-16", "openai")   # downloaded once, then from the cache
    sd, info = weights.read_state_dict(path)         # info: format, whether it is OpenAI's (QuickGELU)
    config, ckpt = weights.vae_files("medvae_4_1_2d")
"""
import collections
import errno
import hashlib
import io
import json
import os
import pickle
import socket
import zipfile
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
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")        # only OpenAI's state dicts have them
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}  # the storage classes a TorchScript pickle names, by their dtype


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
# readers: nothing in a weights file is ever executed

class ScriptObject:
    """What a TorchScript module becomes in our unpickler: its attributes, nothing callable."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch.as_strided(storage, size, stride, offset)


def is_torchscript(path):
    """A TorchScript archive: a zip whose one top folder holds code/ besides data.pkl (torch.save zips do not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/")[1:2] == ["code"] for n in z.namelist())


def read_torchscript(path):
    """{attribute path: tensor} of a TorchScript archive (OpenAI's CLIP .pt). Its data.pkl is unpickled with
    a find_class that yields tensors, dtypes and inert objects only; its code/ is never read."""
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
        prefix = pkl[:-len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return ScriptObject
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

            def persistent_load(self, pid):                      # ('storage', dtype, key, device, numel)
                buf = bytearray(z.read(f"{prefix}data/{pid[2]}"))
                return torch.frombuffer(buf, dtype=pid[1]) if buf else torch.empty(0, dtype=pid[1])

        root = Unpickler(io.BytesIO(z.read(pkl))).load()
    out, todo = {}, [("", root)]
    while todo:
        prefix, obj = todo.pop()
        for k, v in (obj.state.items() if isinstance(getattr(obj, "state", None), dict) else ()):
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
            elif isinstance(v, ScriptObject):
                todo.append((f"{prefix}{k}.", v))
    return out


class Inert:
    """Stands in for a pickled non-tensor object (Lightning hyper-parameters, callbacks, paths): swallows it."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_torch_file(path):
    """torch.load(weights_only=True). Globals that weights_only refuses (listed without running anything by
    get_unsafe_globals_in_checkpoint) are allowed as Inert stand-ins: their code is never imported or run, and
    only tensors are kept from the file. Returns the object and the stand-in names."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []  # not a zip checkpoint: weights_only decides alone
    stand_ins = [(type(n.rsplit(".", 1)[-1], (Inert,), {}), n) for n in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True), names


def read_state_dict(path, flag="--weights"):
    """{key: tensor} from a .safetensors, torch (.bin/.pt/.pth/.ckpt) or TorchScript file, and what we know of it:
    {"format", "openai": True/False/None (unknown), "skipped_objects"}. One-line WeightsUnavailable otherwise."""
    if not os.path.isfile(path):
        raise WeightsUnavailable(f"{path}: no such weights file ({flag})")
    info = dict(format=None, openai=None, skipped_objects=[])
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd, info["format"] = load_file(path), "safetensors"
        elif is_torchscript(path):
            sd, info["format"], info["openai"] = read_torchscript(path), "torchscript", True
        else:
            obj, info["skipped_objects"] = load_torch_file(path)
            sd, info["format"] = obj.get("state_dict", obj) if isinstance(obj, dict) else obj, "torch"
    except Exception as e:
        raise WeightsUnavailable(f"{path}: not a readable weights file ({type(e).__name__}: "
                                 f"{one_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if info["openai"] is None:
        info["openai"] = openai_marker(path, sd)
    return sd, info


def openai_marker(path, sd):
    """True if the file says it holds OpenAI's CLIP (QuickGELU), False if it says otherwise, None if it is silent:
    OpenAI's own extra keys, a hub snapshot's open_clip_config.json beside it, or a hub repo name in its path."""
    if any(k in sd for k in OPENAI_EXTRA_KEYS):
        return True
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                return bool(json.load(f).get("model_cfg", {}).get("quick_gelu", False))
        except (OSError, ValueError):
            pass
    if any(repo.replace("/", "--") in os.path.realpath(path) or repo.replace("/", "--") in os.path.abspath(path)
           for repo in OPENAI_HUB.values()):
        return True
    return None


def load_exact(model, sd, src, optional=(), assign=False):
    """Load exactly the model's keys from sd: name what was ignored, fail on anything missing (keys starting with
    one of `optional` may be absent) or of another shape. assign=True makes sd's tensors (cast to the model's
    dtypes) the model's own, for a model built on the meta device. Returns the ignored keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(tuple(optional))]
    ignored = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise WeightsUnavailable(f"{src}: does not fit this architecture ({len(missing)} missing keys e.g. "
                                 f"{missing[:2]}, {len(wrong)} of another shape e.g. {wrong[:2]}, "
                                 f"{len(ignored)} unexpected e.g. {ignored[:2]})")
    model.load_state_dict({k: v.to(own[k].dtype) if assign else v for k, v in sd.items() if k in own},
                          strict=False, assign=assign)
    return ignored


def summarise_ignored(keys):
    """'loss.* (12), model_ema.* (3)': ignored keys grouped by their first component."""
    groups = collections.Counter(k.split(".")[0] + (".*" if "." in k else "") for k in keys)
    return ", ".join(f"{g} ({n})" for g, n in groups.most_common())


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
