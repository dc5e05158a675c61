"""
Where a run runs and what it leaves: the device (chosen once, here, for every entry script), the checkpoint (one torch.save dict of plain types, saved atomically, loaded with weights_only so
that pickled objects are refused, never executed), JSON written atomically, an output folder checked before the
compute, and the code version stamped on results. train.py writes, evaluate.py, synthesise.py and the ablation read.

    import runfiles
    runfiles.check_writable("runs/x", "--out")           # up front: a one-line ValueError, not a lost result
    runfiles.save_checkpoint(ckpt, "runs/x/run.pt")      # temporary file, then rename
    ckpt = runfiles.load_checkpoint("runs/x/run.pt")     # CheckpointError: missing, truncated, unsafe, newer
    device = runfiles.pick_device("auto")                # ValueError in one line for a device that is not here
"""
import contextlib
import json
import math
import os
import pickle
import subprocess
import tempfile
import uuid

import torch

FORMAT_VERSION = 1


def pick_device(name):
    """--device: auto (cuda, then mps, then cpu) or a torch device that exists here; else one line that says so."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    here = ["auto", "cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "no NVIDIA driver or GPU found" if torch.version.cuda else "this torch is built without CUDA"
        raise ValueError(f"--device {name}: {why}; devices here: {', '.join(here)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; devices here: {', '.join(here)}")
    return device


def bf16_autocast(device, on=True):
    """A context factory: bf16 autocast on CUDA or the CPU when `on` (precision.pick says when), else none."""
    if on and device.type in ("cuda", "cpu"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, of another format or for another model."""


def code_version():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(ckpt, path):
    """torch.save to a temporary file, then rename: a run killed while saving never leaves a corrupt file.
    (torch names the archive inside after the final file's name, not the temporary one: same inputs, same bytes.)"""
    tmp = f"{path}.tmp{uuid.uuid4().hex}"  # unique across the hosts of a shared filesystem
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    """json.dump to a temporary file, then rename (as save_checkpoint)."""
    tmp = f"{path}.tmp{uuid.uuid4().hex}"  # unique across the hosts of a shared filesystem
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_cache(path):
    """The cached encodings, or None when there are none (or they cannot be read: then they are made again)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a cache is never worth a failed run: say so and encode again
        print(f"warning: {path}: unreadable cache ({type(e).__name__}); encoding again")
        return None


def check_writable(path, flag):
    """The folder `path` can be made and written: the nearest existing ancestor is a folder that takes a file."""
    up = os.path.abspath(path)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise ValueError(f"{flag} {path}: {up} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=up).close()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {up} ({e.strerror or type(e).__name__})") from None


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: pickled objects are refused, never executed."""
    if os.path.isdir(path):
        inside = os.path.join(path, "run.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else " (train.py writes <run folder>/run.pt)"
        raise CheckpointError(f"{path}: a folder, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, it holds pickled objects that weights_only loading does not "
                              f"allow ({str(e).splitlines()[-1][:120]})")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file "
                              f"({type(e).__name__})")
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "state_dicts" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ckpt['format_version']} is newer than this code's "
                              f"{FORMAT_VERSION}; update the code")
    return ckpt


def check_finite(step, terms):
    """A loss term that is NaN or infinite stops the run in one line, before anything is saved."""
    for name, value in terms.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: loss term {name} is {value}; the run stopped and no "
                                     f"checkpoint was written for it (try a lower --lr)")
