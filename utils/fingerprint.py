"""What makes two runs of a stage the same run: the one definition of "stale".

A stage run's fingerprint is its stage name, the flags that change its result and the sha256 of
every file it reads:

    {"stage": "mimic",
     "flags": {"lr": 0.01, "epochs": 1000, ...},          # no paths, no FREE flags
     "inputs": {"teacher": "ab12...", "data:cifar10/train": "cd34..."}}

Each stage script declares the files it reads once, as a module-level `input_files(args)`
returning {role: path}; a stage stores its fingerprint in checkpoint.pth, its model files and
results.json, and --resume continues a run only when the fingerprints agree. The runner can
import a stage module, parse a command with its get_parser(), call input_files and compute the
same fingerprint to decide whether a finished run can be reused.

A path flag is replaced by the hash of the file it names, so the same data under another
--data_dir is the same run, and a file replaced at the same path is not.
"""
import hashlib
import json
from pathlib import Path

from .errors import UserError
from .files import load_checkpoint

# Flags that do not change what a stage computes: where it reads and writes, on what device and
# how fast, how often it saves or monitors. --epochs is kept: resume may raise it (see
# utils.stage.TrainingRun.resume), but a finished run of 2 epochs is not one of 4.
FREE = ("results_dir", "device", "num_workers", "debug", "resume", "overwrite", "save_freq", "knn_freq", "eval_freq",
        "channels_last", "cudnn_deterministic")
# Flags that name input files; the files' hashes stand in for them.
PATH_FLAGS = ("data_dir", "teacher", "suspect", "pretrained_encoder", "encoder", "trigger_file", "reference_file")

# (path, size, mtime, ctime, inode) -> sha256 (and ("usage", ...) -> dataset), within one process
_CACHE = {}
_CHUNK = 1 << 20


def file_hash(path):
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks; cached within the process while the
    file's size, times and inode stay the same. A missing or unreadable file is a UserError naming it."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        if key not in _CACHE:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    digest.update(chunk)
            _CACHE[key] = digest.hexdigest()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return _CACHE[key]


def _plain(value):
    """A value as it reads back from JSON (Paths become strings, tuples lists)."""
    return json.loads(json.dumps(value, default=str))


def fingerprint(stage, args_dict, inputs):
    """The fingerprint (a JSON-serialisable dict) of a run of `stage` with arguments args_dict
    (vars(args) as parsed, before main fills in defaults) reading inputs {role: path}. Inputs that
    do not exist are recorded as None: the stage then stops with its own message on reading them."""
    flags = {k: _plain(v) for k, v in sorted(args_dict.items()) if k not in FREE and k not in PATH_FLAGS}
    hashes = {role: file_hash(path) if Path(path).is_file() else None for role, path in sorted(inputs.items())}
    return {"stage": stage, "flags": flags, "inputs": hashes}


def stage_fingerprint(stage, args, input_files):
    """fingerprint() of a stage script: input_files is the script's own input_files function."""
    return fingerprint(stage, vars(args), input_files(args))


def same_run(stored, current):
    """True when `stored` (a fingerprint a stage wrote, or anything read from a file) is that of the
    run `current` describes: the same flags and the same content of every input. The stage's name
    is not compared: the runner names a stage by its script, the stage by itself."""
    return (isinstance(stored, dict) and stored.get("flags") == current.get("flags")
            and stored.get("inputs") == current.get("inputs"))


def _short(digest):
    return "none" if digest is None else f"{digest[:4]}.."


def differences(recorded, current, ignore=()):
    """What differs between two fingerprints, one readable item each, e.g.
    'input teacher changed (sha256 ab12.. -> cd34..)' or '--lr 0.001 -> 0.05'; [] when the same.
    Flags in `ignore` are not compared (--resume passes ('epochs',))."""
    found = []
    if recorded.get("stage") != current.get("stage"):
        found.append(f"stage {recorded.get('stage')} -> {current.get('stage')}")
    old_in, new_in = recorded.get("inputs") or {}, current.get("inputs") or {}
    for role in sorted(set(old_in) | set(new_in)):
        if role not in new_in:
            found.append(f"input {role} no longer read")
        elif role not in old_in:
            found.append(f"input {role} not read before")
        elif old_in[role] != new_in[role]:
            found.append(f"input {role} changed (sha256 {_short(old_in[role])} -> {_short(new_in[role])})")
    old_flags, new_flags = recorded.get("flags") or {}, current.get("flags") or {}
    for key in list(new_flags) + [k for k in old_flags if k not in new_flags]:
        if key in ignore:
            continue
        old, new = old_flags.get(key, "(unset)"), new_flags.get(key, "(unset)")
        if old != new:
            found.append(f"--{key} {old} -> {new}")
    return found


def encoder_usage(path, name=None):
    """The dataset an encoder checkpoint was pre-trained on, as the stages resolve it: `name`
    (the stage's --pretraining_dataset) if given, else the encoder's own, else cifar10. An
    unreadable file gives cifar10; the stage reports the file itself when it loads it."""
    if name:
        return name
    path = Path(path)
    if not path.is_file():
        return "cifar10"
    stat = path.stat()
    key = ("usage", str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _CACHE:
        try:
            ckpt = load_checkpoint(path, verify=False)
        except UserError:
            ckpt = None
        record = ckpt.get("normalization") if isinstance(ckpt, dict) else None
        dataset = record.get("dataset") if isinstance(record, dict) else None
        _CACHE[key] = dataset if isinstance(dataset, str) and dataset else "cifar10"
    return _CACHE[key]

