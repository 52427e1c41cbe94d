"""Atomic file writes, JSON, and weights-only checkpoint loading."""
import hashlib
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
            reason = os_reason(err) if isinstance(err, OSError) else first_line(err)
            raise UserError(f"cannot write {path}: {reason}; the previous version of the file is kept "
                            f"(free some space and run the command again)") from None
        raise


def os_reason(err):
    """The reason of an OSError in words, also for one raised with its errno alone (OSError(28))."""
    code = err.errno
    if code is None and len(err.args) == 1 and isinstance(err.args[0], int):
        code = err.args[0]
    if err.strerror:
        return err.strerror
    return os.strerror(code) if code is not None else first_line(err)



def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
    atomic_write(path, write)


WEIGHTS_HASH = "weights_sha256"


def weights_hash(state_dict):
    """sha256 over the tensors of a state_dict: per key in sorted order its name, dtype, shape and
    bytes. What the file's weights are, independent of how torch.save laid them out."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            continue
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path, obj):
    """torch.save through atomic_write; a checkpoint dict with a state_dict also stores the hash of
    its weights, which load_checkpoint verifies."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = {**obj, WEIGHTS_HASH: weights_hash(obj["state_dict"])}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_tensors(state_dict, path):
    """Every tensor of a state_dict is a dense tensor with data: a sparse or meta tensor is refused."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.layout != torch.strided:
            raise UserError(f"{path}: state_dict entry {key!r} is a {value.layout} tensor; an encoder "
                            f"checkpoint holds dense tensors only")
        if value.is_meta:
            raise UserError(f"{path}: state_dict entry {key!r} is a meta tensor (a shape without data); "
                            f"this file holds no weights")


def verify_weights(ckpt, path):
    """Refuse a checkpoint whose weights differ from the hash stored when it was saved. Files
    without the hash (BadEncoder's released encoders, older runs) are accepted as they are."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return
    check_tensors(ckpt["state_dict"], path)
    stored = ckpt.get(WEIGHTS_HASH)
    if stored is not None and stored != weights_hash(ckpt["state_dict"]):
        raise UserError(f"{path} is corrupt: its weights do not match the hash stored when it was saved; "
                        f"re-run the stage that wrote it")


def load_checkpoint(path, verify=True):
    """Load a checkpoint with weights only: tensors and plain containers, never arbitrary code.
    verify: check the weights against their stored hash (see verify_weights)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        hint = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        if hint and not not_an_opcode(hint):
            raise UserError(f"refusing to load {path}: it holds objects that need code execution to "
                            f"unpickle, which a weights-only load does not run ({hint})") from None
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                        f"({hint or first_line(err)})") from None
    except Exception as err:    # RuntimeError, EOFError, OSError, a zip CRC failure, ...: a damaged file
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    if verify:
        verify_weights(ckpt, path)
    return ckpt


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
