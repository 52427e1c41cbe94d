"""CTRL's poisoning (Li et al., ICCV 2023) as a data step: a poisoned copy of a prepared dataset.

The attacker triggers `ratio` of the whole training set in place, all of them images of the target
class: the first round(ratio * N) target-class images in file order. SimCLR never reads labels,
so plain stage 0 on the copy is the attack.

A data step rather than poisoning inside stage 0: stage 0 stays the one SimCLR trainer, unchanged
(its checks, resuming and distributed paths need no poison branch); the copy can be opened and
inspected like any prepared dataset; and poison.json says exactly which images were changed.

Writes <data_dir>/<name>/train.npz (the source's train split, the poisoned images triggered),
test.npz (the source's, unchanged: stage 0's kNN monitor reads it) and poison.json (what was done:
source and its hash, target, ratio, rounding, indices, the trigger's description). A copy whose
poison.json and train.npz match what would be written is kept; an earlier poisoned copy (with
its poison.json) is replaced, any other dataset in the folder only with force (--force).
"""
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write, save_json
from utils.fingerprint import file_hash

from .frequency import CTRL_MAGNITUDE
from .npz import check_dataset_name, load_split, pretraining_split, save_split, split_path
from .trigger import FrequencyTrigger

CTRL_POISON_RATIO = 0.01
POISON_RECORD = "poison.json"
ROUNDING = "nearest integer to ratio x N, halves up, ratio taken as the decimal it is written as"


def poison_count(ratio, n):
    """How many images a poisoning ratio touches among n: round(ratio * n), halves rounded up.

    The ratio is read as the decimal it is written as (0.29 is 29/100, not the float below it),
    so 0.29 of 50 images is 14.5 -> 15 whatever the float rounding of 0.29 * 50 gives."""
    exact = Fraction(str(ratio)) * n
    return math.floor(exact + Fraction(1, 2))


def poison_indices(y, target_label, ratio):
    """Indices (file order) of the images to trigger: the first poison_count(ratio, len(y)) of the target class."""
    if not 0 < ratio <= 1:
        raise UserError(f"--poison_ratio must lie in (0, 1], got {ratio}")
    count = poison_count(ratio, len(y))
    if count < 1:
        raise UserError(f"--poison_ratio {ratio} of {len(y)} images rounds to 0 images; raise it")
    of_target = np.flatnonzero(np.asarray(y) == target_label)
    if len(of_target) < count:
        raise UserError(f"--poison_ratio {ratio} of {len(y)} images asks for {count} images of the target class "
                        f"{target_label}, but it has {len(of_target)}; lower --poison_ratio")
    return of_target[:count]


def _kept(out, record):
    """True when the copy on disk is the one `record` describes (its train.npz unchanged since)."""
    try:
        old = json.loads((out / POISON_RECORD).read_text())
    except (OSError, ValueError):
        return False
    same = {k: v for k, v in old.items() if k != "train_sha256"} == record
    return (same and (out / "test.npz").is_file() and (out / "train.npz").is_file()
            and old.get("train_sha256") == file_hash(out / "train.npz"))


def poison_ctrl(data_dir, source, name, target_label, ratio=CTRL_POISON_RATIO, trigger=None, force=False):
    """Write the CTRL-poisoned copy <data_dir>/<name>/ of the prepared dataset `source`; returns poison.json's dict
    plus "status" ("written" or "kept"). trigger: a FrequencyTrigger (default: CTRL's parameters)."""
    check_dataset_name(name)
    if name == source:
        raise UserError(f"the poisoned copy needs its own name; --name {name} is the source dataset")
    if pretraining_split(source) != "train":
        raise UserError(f"{source} is pre-trained on its unlabeled split {pretraining_split(source)}; CTRL's "
                        f"poisoning picks target-class images, so it needs a labelled train split")
    trigger = trigger or FrequencyTrigger()
    if trigger.magnitude == 0:
        raise UserError(f"--ctrl_magnitude 0 changes no image: the poisoned copy would equal {source}; pass a "
                        f"non-zero magnitude (CTRL's is {CTRL_MAGNITUDE:g})")
    x, y = load_split(data_dir, source, "train")
    trigger.check(x.shape[1:3])
    test = split_path(data_dir, source, "test")
    load_split(data_dir, source, "test")
    index = poison_indices(y, target_label, ratio)
    out = Path(data_dir) / name
    record = {"attack": "ctrl", "source": source,
              "source_train_sha256": file_hash(split_path(data_dir, source, "train")),
              "source_test_sha256": file_hash(test), "target_label": int(target_label), "poison_ratio": ratio,
              "rounding": ROUNDING, "images": len(y), "poisoned": len(index), "indices": index.tolist(),
              "trigger": trigger.describe()}
    if not force and _kept(out, record):
        return {**record, "status": "kept"}
    existing = [f for f in ("train.npz", "test.npz") if (out / f).exists()]
    if existing and not force and not (out / POISON_RECORD).is_file():     # not an earlier poisoned copy
        raise UserError(f"{out} already holds a dataset ({', '.join(existing)}), not a poisoned copy; pass --force "
                        f"to replace it, or choose another --name")
    poisoned = x.copy()
    poisoned[index] = trigger.apply(x[index])      # only the chosen images, batched
    save_split(out / "train.npz", poisoned, y)

    def copy(tmp):
        shutil.copyfile(test, tmp)
    atomic_write(out / "test.npz", copy)
    save_json(out / POISON_RECORD, {**record, "train_sha256": file_hash(out / "train.npz")})
    return {**record, "status": "written"}
