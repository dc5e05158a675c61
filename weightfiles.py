"""
Reading weight files without running anything in them: safetensors, torch state dicts (weights_only), OpenAI's
TorchScript archives (their tensors only, read with an unpickler that builds tensors and nothing else), and
Lightning checkpoints, whose pickled extras (hyper-parameters, callbacks, paths) are replaced by inert stand-ins
so that weights_only loading accepts them. Then loading exactly a model's keys, and naming what was left out.
Where the files come from is weights.py.

    import weightfiles
    sd, info = weightfiles.read_state_dict(path)         # info: format, whether it is OpenAI's (QuickGELU)
    ignored = weightfiles.load_exact(model, sd, path)     # one-line WeightsUnavailable for anything missing
"""
import collections
import io
import json
import os
import pickle
import zipfile

import torch

from weights import OPENAI_HUB, WeightsUnavailable, one_line

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")        # only OpenAI's state dicts have them
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}  # the storage classes a TorchScript pickle names, by their dtype


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
