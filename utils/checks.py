"""One validation layer: every check of a flag, a data file, a checkpoint or a trained model.

Flags are checked when they are parsed (the `type=` callables below: argparse prints one usage
line and `error: argument --lr: must be ...` and exits 2). Files and models are checked by the
check_* functions, which raise UserError with one line that names the file or flag and says what
to do. Nothing here builds a model: checkpoints are validated before anything is allocated.
"""
import argparse
import json
import math
import numbers
import re
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

# The names of models.encoder.ARCHS (tests/test_checks.py keeps the two in step; utils does not
# import models).
ENCODER_ARCHS = ("resnet18", "resnet34", "resnet50")

# Flags that may change between a run and its --resume because they do not change what is
# trained: how long, where, how often to save or monitor, and how the tensors are laid out.
FREE_ON_RESUME = ("epochs", "save_freq", "resume", "overwrite", "debug", "device", "num_workers",
                  "data_dir", "results_dir", "knn_freq", "channels_last")

SEED_LIMIT = 2 ** 32            # numpy's seeds are below 2**32


# ---------------------------------------------------------------- argparse types

def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _int_type(lo, hi, desc, name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value
    return _named(parse, name)


def int_at_least(n):
    """argparse type: an integer >= n."""
    return _int_type(n, None, f"an integer >= {n}", f"int_at_least_{n}")


positive_int = _int_type(1, None, "a positive integer", "positive_int")
nonnegative_int = _int_type(0, None, "a non-negative integer", "nonnegative_int")
seed_int = _int_type(0, SEED_LIMIT - 1, f"an integer from 0 to {SEED_LIMIT - 1}", "seed_int")


def _float_desc(lo, hi, lo_open, hi_open):
    if lo is None and hi is None:
        return "a finite number"
    if hi is None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def float_in(lo=None, hi=None, lo_open=False, hi_open=False, name=None):
    """argparse type: a finite float within [lo, hi] (None = unbounded; *_open excludes the end)."""
    desc = _float_desc(lo, hi, lo_open, hi_open)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value
    return _named(parse, name or "float_in")


finite_float = float_in(name="finite_float")
positive_float = float_in(0, lo_open=True, name="positive_float")
nonnegative_float = float_in(0, name="nonnegative_float")
fraction = float_in(0, 1, lo_open=True, name="fraction")             # e.g. --ratio
unit_interval = float_in(0, 1, hi_open=True, name="unit_interval")   # e.g. --momentum
# Learning rates: above ~3e37 Adam's step size overflows float32 into a traceback, and no useful
# rate is anywhere near 10, so larger values are refused at parse time.
learning_rate = float_in(0, 10, lo_open=True, name="learning_rate")


# ---------------------------------------------------------------- data files

def check_labels(y, path, max_classes=100_000):
    """Labels are class indices: integers in 0..max_classes-1."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {y.dtype}")
    if y.size == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise UserError(f"{path}: labels must be non-negative class indices, found {low}")
    if high >= max_classes:
        raise UserError(f"{path}: label {high} is not a class index (more than {max_classes} classes); "
                        f"labels must be 0..C-1")


def check_split(x, y, path, min_size=8, max_classes=100_000):
    """A split the encoder can use: at least one image, images at least min_size pixels each way
    (the ResNet downsamples 8x), one valid label per image. x: NxHxWx3."""
    if len(x) == 0:
        raise UserError(f"{path} holds no images; a split needs at least one")
    if len(y) != len(x):
        raise UserError(f"{path}: {len(x)} images but {len(y)} labels")
    height, width = x.shape[1], x.shape[2]
    if height < min_size or width < min_size:
        raise UserError(f"{path}: images are {height}x{width} pixels; the encoder needs at least "
                        f"{min_size}x{min_size} (it downsamples them 8 times)")
    check_labels(y, path, max_classes)


def check_trigger(t, tm, path):
    """Triggers t (K,H,W,3) in [0, 255] and masks tm of exactly 0 and 1, K >= 1, all finite."""
    t, tm = np.asarray(t), np.asarray(tm)
    if t.shape != tm.shape:
        raise UserError(f"{path}: t and tm must have the same shape, got {t.shape} and {tm.shape}")
    if t.ndim == 4 and t.shape[0] == 0:
        raise UserError(f"{path} holds no trigger (K = 0); regenerate it with python -m datasets.make_triggers")
    for name, arr in (("t", t), ("tm", tm)):
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise UserError(f"{path}: {name} holds NaN or infinite values")
    if t.min() < 0 or t.max() > 255:
        raise UserError(f"{path}: t must lie in [0, 255], found values from {t.min():g} to {t.max():g}")
    bad = tm[(tm != 0) & (tm != 1)]
    if bad.size:
        raise UserError(f"{path}: tm must hold only 0 and 1 (1 keeps the pixel), found {bad.flat[0]:g}")


def check_reference_labels(y, path):
    """All reference inputs carry the one target label; returns it."""
    labels = np.unique(np.asarray(y))
    if labels.size == 0:
        raise UserError(f"reference file {path} holds no reference inputs")
    if labels.size > 1:
        shown = [str(v) for v in labels[:5]]
        listed = ", ".join(shown[:-1]) + f" and {shown[-1]}" + (" ..." if labels.size > 5 else "")
        raise UserError(f"reference file {path} holds labels {listed}; every reference input must have "
                        f"the target label")
    label = int(labels[0])
    if label < 0:
        raise UserError(f"reference file {path} holds label {label}; the target label must be a "
                        f"non-negative class index")
    return label


# ---------------------------------------------------------------- checkpoints

def _bounded_int(value, name, high, path):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
        raise UserError(f"{path}: {name} must be an integer from 1 to {high}, got {value!r}")
    return int(value)


def _layout_arch(state_dict):
    """The architecture the keys belong to: bottleneck convs mean ResNet-50, a third layer1 block ResNet-34."""
    if "f.f.3.0.conv3.weight" in state_dict:
        return "resnet50"
    return "resnet34" if "f.f.3.2.conv1.weight" in state_dict else "resnet18"


def check_encoder_checkpoint(ckpt, path, max_width=1024, max_proj_dim=65536):
    """Validate a loaded encoder checkpoint before any model is built; return its config
    {'arch', 'width', 'proj_dim'}.

    ckpt: what utils.files.load_checkpoint returned: our dict (state_dict + arch), or BadEncoder's
    release (weights at the top level or under 'state_dict', no 'arch', keys maybe 'module.'-prefixed).
    Width and projection size are bounded, so a file that claims a huge network is refused at once
    instead of allocating it.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not an encoder checkpoint (expected a dict with 'state_dict', "
                        f"got a {type(ckpt).__name__})")
    state_dict = ckpt.get("state_dict", ckpt)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: its 'state_dict' is a {type(state_dict).__name__}, not a dict of tensors")
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if "f.f.0.weight" not in state_dict:
        raise UserError(f"{path} has no SimCLR encoder weights (expected keys f.f.0.weight, ..., g.3.bias)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a "
                            f"tensor; this is not an encoder checkpoint")
    stem = state_dict["f.f.0.weight"]
    if stem.ndim != 4 or stem.shape[1] != 3:
        raise UserError(f"{path}: f.f.0.weight has shape {tuple(stem.shape)}; expected (width, 3, 3, 3)")
    head = state_dict.get("g.3.weight")
    layout = _layout_arch(state_dict)

    arch = ckpt.get("arch")
    if arch is None:
        config = {"arch": layout, "width": stem.shape[0],
                  "proj_dim": head.shape[0] if head is not None else 128}
    elif isinstance(arch, dict):
        config = {"arch": arch.get("arch", "resnet18"), "width": arch.get("width", 64),
                  "proj_dim": arch.get("proj_dim", 128)}
    else:
        raise UserError(f"{path}: its 'arch' entry must be a dict such as {{'arch': 'resnet18', "
                        f"'width': 64, 'proj_dim': 128}}, got a {type(arch).__name__}")
    if config["arch"] not in ENCODER_ARCHS:
        raise UserError(f"{path}: arch {config['arch']!r} is not one of {', '.join(ENCODER_ARCHS)}")
    config["width"] = _bounded_int(config["width"], "width", max_width, path)
    config["proj_dim"] = _bounded_int(config["proj_dim"], "proj_dim", max_proj_dim, path)
    if config["arch"] != layout:
        raise UserError(f"{path}: arch says {config['arch']} but the weights have the layout of {layout}")
    if config["width"] != stem.shape[0]:
        raise UserError(f"{path}: arch says width {config['width']} but f.f.0.weight has "
                        f"{stem.shape[0]} channels")
    if head is not None and config["proj_dim"] != head.shape[0]:
        raise UserError(f"{path}: arch says proj_dim {config['proj_dim']} but g.3.weight has "
                        f"{head.shape[0]} rows")
    return config


def infer_stage(ckpt):
    """The stage that wrote one of our checkpoints: its 'stage' key, else guessed from its keys."""
    if "stage" in ckpt:
        return ckpt["stage"]
    if "mi" in ckpt:
        return "mimic"
    return "badencoder" if "target_label" in ckpt else "clean_encoder"


def check_stage(ckpt, path, expected_stage):
    """--resume continues only a run of the same stage; returns the stage."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"--resume: {path} is not a checkpoint written by this project; use a new "
                        f"--results_dir")
    stage = infer_stage(ckpt)
    if stage != expected_stage:
        raise UserError(f"--resume: {path} was written by stage {stage!r}, not {expected_stage!r}; "
                        f"use a new --results_dir")
    return stage


def _plain(value):
    """A value as it reads back from args.json (Paths become strings, tuples lists)."""
    return json.loads(json.dumps(value, default=str))


def resume_conflicts(stored_args, new_args, free=FREE_ON_RESUME):
    """Flags whose value differs between the stored run and the new command, as
    ['--lr 0.001 -> 0.05', ...] in the order of new_args; flags in `free`, and flags only one side
    knows (an args.json older than a flag), are ignored."""
    conflicts = []
    for key in new_args:
        if key in free or key not in stored_args:
            continue
        old, new = _plain(stored_args[key]), _plain(new_args[key])
        if old != new:
            conflicts.append(f"--{key} {old} -> {new}")
    return conflicts


def refuse_resume_conflicts(conflicts, out_dir):
    if conflicts:
        raise UserError(f"--resume: these flags differ from the run in {out_dir}: {', '.join(conflicts)}; "
                        f"pass the original values, or start a new --results_dir")


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


# ---------------------------------------------------------------- trained models

def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def check_finite_encoder(model, image_size, device, stage_name):
    """Refuse to keep an encoder whose weights, buffers or features (on a fixed probe batch of 4
    images, eval mode, no grad) hold NaN or inf. The train/eval modes are restored afterwards.

    image_size: int or (H, W). Pass the unwrapped model: a DDP forward would run collectives.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    if any(t.is_floating_point() and not torch.isfinite(t).all() for _, t in tensors):
        raise UserError(f"the {stage_name} encoder has non-finite weights (NaN/inf) after training; it "
                        f"was not saved as a result. Lower --lr and run again")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    dtype = next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32)
    probe = torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = _tensors(model(probe.to(device=device, dtype=dtype)))
    finally:
        for module, training in modes.items():
            module.training = training
    if not all(torch.isfinite(t).all() for t in out if t.is_floating_point()):
        raise UserError(f"the {stage_name} encoder has non-finite features (NaN/inf) after training; it "
                        f"was not saved as a result. Lower --lr and run again")


def check_finite_features(feats, what, path):
    """Stage 3: features of the encoder under test must be finite before they are scored."""
    finite = torch.isfinite(feats).all() if isinstance(feats, torch.Tensor) else np.isfinite(feats).all()
    if not finite:
        raise UserError(f"the encoder {path} gives non-finite features on {what}; it cannot be scored "
                        f"(a broken encoder is not a removed backdoor)")


def check_finite_loss(value, epoch):
    """The downstream classifier's guard: stop on a NaN or infinite epoch loss."""
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"the downstream classifier's loss became {value} at epoch {epoch}; stopped. "
                        f"Lower --lr and run again")
