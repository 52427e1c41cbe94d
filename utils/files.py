"""Atomic file writes, JSON, and weights-only checkpoint loading."""
import json
import os
import pickle
import pickletools
import re
import tempfile
from pathlib import Path

import torch

from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file intact. A failed
    write (a full disk, a read-only folder) is a UserError naming the file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write as a RuntimeError ("... file write failed")
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "write" in str(err)):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
            raise UserError(f"cannot write {path}: {reason}; the previous version of the file is kept "
                            f"(free some space and run again with --resume)") from None
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
    if path.stat().st_size == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        hint = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        if hint and not not_an_opcode(hint):
            raise UserError(f"refusing to load {path}: it holds objects that need code execution to "
                            f"unpickle, which a weights-only load does not run ({hint})") from None
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                        f"({hint or first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None


_OPCODES = {op.code for op in pickletools.opcodes}


def not_an_opcode(hint):
    """True for the weights-only unpickler's "Unsupported operand N" when byte N is no pickle opcode
    at all: the file is not a pickle (JSON, random bytes), rather than one that would run code."""
    match = re.search(r"Unsupported operand (\d+)", hint)
    return match is not None and chr(int(match.group(1))) not in _OPCODES


def first_line(err):
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def remove_stale_temporaries(folder):
    """Delete the .<name>.XXXXXXXX.tmp files that utils.files.atomic_write leaves when killed;
    return their names. Call it while holding the folder's RunLock."""
    pattern = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
