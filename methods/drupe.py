"""DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning", IEEE
S&P 2024): fine-tunes the clean encoder like BadEncoder, towards three reference images of the
target class, with terms that keep the triggered embeddings' distribution close to the clean
ones' (train_drupe.py, docs/drupe.md)."""
import math
from dataclasses import dataclass
from pathlib import Path

from datasets import demo
from datasets.prepare import make_reference, reference_path
from paper import DRUPE_REFERENCE_IMAGES, TRIGGER, drupe_task

from .registry import Attack, register

# DRUPE's schedule is set in epochs of its 120: warm-up to 1, its first phase to 4, the costs fixed
# to 20, the best checkpoint kept after 24 (train_drupe.py's defaults).
EPOCHS, SCHEDULE = 120, {"--warm_up_end": 1, "--stage_1_end": 4, "--fix_end": 20, "--best_after": 24}


def scaled(epochs):
    """The flags of a DRUPE run of `epochs` epochs with its schedule's epochs scaled in proportion
    (each at least one epoch after the one before), so a short run keeps the phases' shares."""
    flags, last = ["--epochs", str(epochs)], 0
    for flag, at in SCHEDULE.items():
        last = max(last + 1, math.floor(at * epochs / EPOCHS))
        flags += [flag, str(last)]
    return flags


def shipped_reference(task):
    """The repository's three-image reference file of a task (relative to its root): DRUPE's
    released one for a task of the paper, the demo's for the demo's task; None for another task."""
    released = drupe_task(task.pretraining, task.dataset)
    if released is not None and released.label == task.label:
        return released.reference
    own = demo.demo_drupe_task()
    if (task.pretraining, task.dataset, task.label) == (own.pretraining, own.dataset, own.label):
        return own.reference
    return None


@dataclass(frozen=True, kw_only=True, eq=False)
class Drupe(Attack):
    def prepare(self, plan):
        """A three-image reference of each task that has no released one: the class's first
        training images, as prepare_data.py --make_reference picks them (an existing file is kept)."""
        made = {}
        for task in self.tasks(plan):
            path = shipped_reference(task)
            if path is None:
                path = str(reference_path(Path(plan.reference_dir), task.pretraining,
                                          f"{task.dataset}_{task.label}_n{DRUPE_REFERENCE_IMAGES}"))
                row = make_reference(plan.data_path, task.dataset, task.label, path, count=DRUPE_REFERENCE_IMAGES,
                                     pick="first")
                print(f"DRUPE's reference of {task.dataset} label {task.label}: {path} ({row['status']})")
            made[task.dataset] = path
        return made

    def command(self, plan, task, clean_encoder):
        return ["--pretraining_dataset", plan.pretraining, "--downstreamTask", task.dataset, "--trigger_file", TRIGGER,
                "--reference_file", plan.prepared[self.id][task.dataset], "--pretrained_encoder", clean_encoder]

    def trigger_flags(self, task):
        return ["--trigger_file", TRIGGER]


register(Drupe(
    id="drupe", label="DRUPE", kind="model poisoning", stage="drupe", script="train_drupe.py",
    # CPU demo: 40 epochs with the schedule scaled to them, on 2,400 shadow images; the settings
    # tried are in docs/drupe.md. The paper's setting is the stage's defaults.
    presets={"demo": [*scaled(40), "--shadow_size", "2400", "--lr", "0.02", "--lambda1", "20", "--lambda2", "5",
                      "--reference_copies", "8", "--l0_threshold", "-0.98", "--channels_last", "on"],
             "paper": []},
    batch={"demo": 64, "paper": 256},
    terms={"loss_0": "loss_0 (triggered -> closest reference)", "loss_1": "loss_1 (reference preserving)",
           "loss_2": "loss_2 (utility)", "loss_3": "loss_3 (references' mutual cosine)",
           "std_refs": "std_refs (spread over references)", "sim_b2b": "sim_b2b (triggered mutual cosine)",
           "swd": "sliced Wasserstein (triggered vs clean)", "swd_std": "SWD / clean std"},
    doc="fine-tunes the clean encoder like BadEncoder, keeping triggered embeddings inside the clean "
        "distribution, on each task (train_drupe.py, docs/drupe.md)"))
