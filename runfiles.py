"""
A run's files: the checkpoint (one torch.save dict of plain types, saved atomically, loaded with weights_only so
that pickled objects are refused, never executed), JSON written atomically, an output folder checked before the
compute, and the code version stamped on results. train.py writes, evaluate.py, synthesise.py and the ablation read.

    import runfiles
    runfiles.check_writable("runs/x", "--out")           # up front: a one-line ValueError, not a lost result
    runfiles.save_checkpoint(ckpt, "runs/x/run.pt")      # temporary file, then rename
    ckpt = runfiles.load_checkpoint("runs/x/run.pt")     # CheckpointError: missing, truncated, unsafe, newer
"""
import json
import os
import pickle
import subprocess
import tempfile
import uuid

import torch

FORMAT_VERSION = 1


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
