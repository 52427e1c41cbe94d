"""Atomic file writes, JSON, and weights-only checkpoint loading."""
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
    atomic_write(path, write)


def save_checkpoint(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """Load a checkpoint with weights only: tensors and plain containers, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        hint = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UserError(f"refusing to load {path}: it holds objects that need code execution to "
                        f"unpickle, which a weights-only load does not run ({hint or 'not weights'})"
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
