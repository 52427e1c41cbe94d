"""Which data a run uses (a preset's, a subset of its tasks, or the user's own), checked before
any stage starts: every missing file is named with the prepare_data.py command that makes it."""
import argparse
import dataclasses
import shlex
import zipfile
from pathlib import Path

import numpy as np

import methods
from datasets import demo, load_trigger, pretraining_split
from datasets.npz import check_reference_label, npz_shape, split_path
from datasets.prepare import PAPER_DATASETS, PAPER_REFERENCES, make_reference, reference_path
from paper import TRIGGER, Task
from utils.cli import fraction
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def defence_ids():
    """What --defenses may name: every registered defence but the controls, in table order."""
    return tuple(methods.defences(controls=False))


def method_list(text):
    """--defenses: comma-separated defence ids (defence_ids()); the tables keep the registry's order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in defence_ids()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose among {','.join(defence_ids())}")
    return list(dict.fromkeys(names))


def _registered(text, known):
    """Comma-separated ids among `known` (registry ids), returned in the registry's order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}; "
                                         f"choose among {','.join(known) or 'none registered'}")
    return [i for i in known if i in names]


def attack_list(text):
    """--attacks: comma-separated attack ids of methods.attacks(), in table order."""
    return _registered(text, tuple(methods.attacks()))


def detector_list(text):
    """--detect: comma-separated detection defence ids of methods.detectors(), in table order."""
    return _registered(text, tuple(methods.detectors()))


def ratio_list(text):
    """--ratios: comma-separated clean-data fractions in (0, 1], in increasing order, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty list; give fractions such as 0.01,0.04,0.2")
    return sorted({fraction(n) for n in names})


def name_list(text):
    """--tasks: comma-separated dataset names."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def task_spec(text):
    """--task DATASET:LABEL[:REFERENCE] -> a Task whose pre-training dataset is filled in later
    and whose reference is a full path, or None when one is to be made."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected DATASET:LABEL[:REFERENCE], got {text!r}")
    try:
        label = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"LABEL must be an integer class, got {parts[1]!r} in {text!r}") from None
    reference = str(Path(parts[2]).resolve()) if len(parts) == 3 and parts[2] else None
    return Task(None, parts[0], label, reference)


def select_data(preset, preset_name, pretraining=None, own_tasks=None, subset=None):
    """(pre-training dataset, tasks) of a run: the preset's, a subset of its tasks by downstream
    dataset (subset, from --tasks), or the user's own (pretraining, own_tasks from --task)."""
    tasks = preset.tasks
    if own_tasks and subset:
        raise UserError("--tasks picks among the preset's tasks and --task names your own; pass one of them")
    if subset:
        known = {t.dataset: t for t in tasks}
        unknown = [n for n in subset if n not in known]
        if unknown:
            raise UserError(f"--tasks: the {preset_name} preset has no task {', '.join(unknown)} "
                            f"(its tasks: {', '.join(known)})")
        tasks = [known[n] for n in subset]
    pretraining = pretraining or preset.pretraining
    tasks = [dataclasses.replace(t, pretraining=pretraining) for t in (own_tasks or tasks)]
    names = [t.dataset for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:   # every stage folder is named after the downstream dataset
        raise UserError(f"--task names {twice[0]} more than once; one target label per downstream dataset "
                        f"and results folder (use another --results_dir for the other label)")
    return pretraining, tasks


def npz_labels(path):
    """The labels (y) of a split, flattened."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = np.asarray(npz["y"]).ravel()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"cannot read the labels of {path}: {err}") from None
    if labels.size == 0:
        raise UserError(f"{path} holds no images; a split needs at least one")
    return labels


def prepare_commands(missing_splits, missing_refs, data_dir):
    """The commands that create the missing dataset folders and reference files (the authors'
    released reference files are shipped in the repository: git restores them)."""
    paper = [n for n in missing_splits if n in PAPER_DATASETS]
    paper_refs = [p for p in missing_refs
                  if p in {reference_path(ROOT / "reference", u, n) for u, n, _, _ in PAPER_REFERENCES}]
    commands = []
    if paper:
        which = ["all"] if set(paper) == set(PAPER_DATASETS) else paper
        commands.append(" ".join(["python prepare_data.py", "--dataset", *which, "--download", "--out", str(data_dir)]))
    if paper_refs:
        commands.append(" ".join(["git checkout --", *(str(p.relative_to(ROOT)) for p in paper_refs)]))
    commands += [f"python prepare_data.py --image_folder DIR --name {n} --out {data_dir}"
                 for n in missing_splits if n not in PAPER_DATASETS]
    if len(paper_refs) < len(missing_refs):
        commands.append("python prepare_data.py --make_reference DATASET LABEL NAME --pretraining_dataset P "
                        "(or leave REFERENCE out of --task to have one made)")
    return "; ".join(commands)


def check_data(pretraining, tasks, data_dir, who):
    """One clear line for the first problem: missing files, a target label absent from the task's
    labels, a trigger of another size than the images."""
    splits = [(pretraining, s) for s in dict.fromkeys(("train", pretraining_split(pretraining)))]
    splits += [(t.dataset, s) for t in tasks for s in ("train", "test")]
    missing = [split_path(data_dir, n, s) for n, s in splits if not split_path(data_dir, n, s).exists()]
    missing_refs = [ROOT / t.reference for t in tasks if t.reference is not None and not (ROOT / t.reference).exists()]
    if missing or missing_refs:
        names = list(dict.fromkeys(p.parent.name for p in missing))
        raise UserError(f"{who} needs prepared data; missing: {', '.join(map(str, missing + missing_refs))}. "
                        f"Create it with: {prepare_commands(names, missing_refs, data_dir)}")
    for t in tasks:
        for split in ("test",) if t.reference else ("test", "train"):
            path = split_path(data_dir, t.dataset, split)
            labels = npz_labels(path)
            if t.label not in labels:
                raise UserError(f"label {t.label} does not occur in {path} (its labels run from "
                                f"{labels.min()} to {labels.max()})")
        if t.reference is not None:      # as stage 3 checks it, before stages 0-2 train
            check_reference_label(t.label, ROOT / t.reference, f"the label {t.label} of task {t.dataset}",
                                  "pass the reference file of that class, or leave REFERENCE out of --task to have "
                                  "one made")
    trigger, _ = load_trigger(ROOT / TRIGGER)
    for name, split in [(pretraining, "train")] + [(t.dataset, "test") for t in tasks]:
        path = split_path(data_dir, name, split)
        shape = tuple(npz_shape(path, "x"))
        if len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path}: x has shape {shape}; expected (N, H, W, 3) images (prepare_data.py writes them)")
        size = shape[1:3]
        if size != trigger.shape[:2]:
            raise UserError(f"the trigger {TRIGGER} is {trigger.shape[0]}x{trigger.shape[1]} pixels but the "
                            f"images of {path} are {size[0]}x{size[1]}; prepare the dataset at "
                            f"{trigger.shape[0]}x{trigger.shape[1]} (prepare_data.py does)")


def add_references(tasks, data_dir, reference_dir):
    """The tasks, each with a reference file: a task without one gets the class's reference made by
    prepare_data.py --make_reference's rule, in <reference_dir>/<pretraining>/<dataset>_<label>.npz
    (an existing valid file is kept)."""
    done = []
    for t in tasks:
        if t.reference is None:
            path = reference_path(Path(reference_dir).resolve(), t.pretraining, f"{t.dataset}_{t.label}")
            row = make_reference(data_dir, t.dataset, t.label, path)
            print(f"reference of {t.dataset} label {t.label}: {path} ({row['status']})")
            t = dataclasses.replace(t, reference=str(path))
        done.append(t)
    return done


def prepare_data(plan, who, reference_dir):
    """Everything a run's stages read, made or checked before any of them starts: the demo data
    (generated when missing), each attack's tasks' files, what each attack prepares itself (e.g.
    CTRL's poisoned copy, in plan.prepared), and a reference file for every task without one
    (in plan.tasks)."""
    data_dir = Path(plan.data_dir)
    if {plan.pretraining, *(t.dataset for t in plan.tasks)} & set(demo.CLASSES):
        print("== demo data")
        demo.make_demo_data(data_dir, ROOT / "reference", **demo.DEFAULTS)
    on_tasks = False                     # whether an attack targets the run's tasks (not only its own)
    for attack_id in plan.attacks:
        attack = methods.get(attack_id)
        tasks = attack.tasks(plan)
        on_tasks = on_tasks or any(t in plan.tasks for t in tasks)
        check_data(plan.pretraining, tasks, data_dir, f"{attack.label} in {who}" if attack.named else who)
        plan.prepared[attack_id] = attack.prepare(plan)
    if on_tasks:
        plan.tasks = add_references(plan.tasks, data_dir, reference_dir)


def stage_flags(text, flag):
    """The extra flags of one --<stage>_args, split as a shell would; a bad quote is one line."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise UserError(f"{flag} {text!r}: {err} (quote the flags as in a shell)") from None
