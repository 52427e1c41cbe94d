"""The paper's setting, defined once: the facts that more than one stage, the data preparation and
the pipeline share. Plain data, no code from this project is imported here.

Each stage's own hyperparameters (learning rates, epochs, ...) are the defaults of its flags; the
MI estimator's are models.mine.MISettings. Paths are relative to the repository root.
"""
from dataclasses import dataclass

# The default trigger: a white 10x10 square at rows and columns 21..30 of a 32x32 image (the
# 224x224 variant: 50x50 at 173..222). Both files are BadEncoder's released ones, byte for byte
# (trigger/README.md); python -m datasets.check_triggers checks them.
TRIGGER = "trigger/trigger_pt_white_21_10_ap_replace.npz"
RELEASED_TRIGGERS = {  # file -> (image size, first row/column, side, md5 of the released file)
    TRIGGER: (32, 21, 10, "cb2bc0817f9c68c942b89c822b5a6a79"),
    "trigger/trigger_pt_white_173_50_ap_replace.npz": (224, 173, 50, "1889a226789cc99a83697159107685bf"),
}


@dataclass(frozen=True)
class Task:
    """A downstream task of the attack: the dataset, the attacker's target label in it, and the
    reference file holding the target's reference input(s) for an encoder pre-trained on `pretraining`."""
    pretraining: str
    dataset: str
    label: int
    reference: str

    @property
    def key(self):
        """How the task is named in summaries and tables."""
        return f"{self.dataset} (target {self.label})"


def _released(pretraining, dataset, label, name):
    return Task(pretraining, dataset, label, f"reference/{pretraining}/{name}.npz")


# The BadEncoder/MIMIC targets, with the authors' released reference files (reference/README.md).
TASKS = {
    "cifar10": (_released("cifar10", "gtsrb", 12, "priority"),
                _released("cifar10", "svhn", 1, "one"),
                _released("cifar10", "stl10", 9, "truck")),
    "stl10": (_released("stl10", "gtsrb", 12, "priority"),
              _released("stl10", "svhn", 1, "one"),
              _released("stl10", "cifar10", 0, "airplane")),
}


def find_task(tasks, pretraining, dataset):
    """The task on `dataset` for encoders pre-trained on `pretraining` among `tasks` ({pretraining
    dataset: [Task]}, TASKS or DRUPE_TASKS), or None."""
    return next((t for t in tasks.get(pretraining, ()) if t.dataset == dataset), None)


def paper_task(pretraining, dataset):
    """The paper's task on `dataset` for encoders pre-trained on `pretraining`, or None."""
    return find_task(TASKS, pretraining, dataset)

# md5 of each released reference file, as published (tests/test_protocol.py checks the shipped bytes).
RELEASED_REFERENCES = {
    "reference/cifar10/priority.npz": "87885aff0201494951722fb6952d2b61",
    "reference/cifar10/one.npz": "dfbea5e2be57f8ec2502b91674d85523",
    "reference/cifar10/truck.npz": "6f51130b68b36684cbc5b54cdcdf0824",
    "reference/stl10/priority.npz": "87885aff0201494951722fb6952d2b61",
    "reference/stl10/one.npz": "dfbea5e2be57f8ec2502b91674d85523",
    "reference/stl10/airplane.npz": "0991e769bd54b6894264565cd669a0e4",
}

# DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning", IEEE
# S&P 2024) pulls triggered inputs towards three reference images of the target class. Its code
# (Gwinhen/DRUPE, commit e16077d) ships them as reference/<dataset>_l<label>_n3.npz, x uint8
# (3, 32, 32, 3) and y uint8 (3, 1), named by the downstream task alone: CIFAR-10 and STL-10
# encoders share a file. Copied byte for byte into reference/drupe/ (reference/README.md).
DRUPE_REFERENCE_IMAGES = 3


def _drupe(task):
    name = f"{task.dataset}_l{task.label}_n{DRUPE_REFERENCE_IMAGES}"
    return Task(task.pretraining, task.dataset, task.label, f"reference/drupe/{name}.npz")


# The paper's tasks (TASKS) with DRUPE's reference files in place of BadEncoder's.
DRUPE_TASKS = {pretraining: tuple(_drupe(t) for t in tasks) for pretraining, tasks in TASKS.items()}


def drupe_task(pretraining, dataset):
    """DRUPE's version of the paper's task on `dataset` for `pretraining` encoders, or None."""
    return find_task(DRUPE_TASKS, pretraining, dataset)


# md5 of each of DRUPE's released reference files (tests/test_drupe_stage.py checks the shipped bytes).
RELEASED_DRUPE_REFERENCES = {
    "reference/drupe/gtsrb_l12_n3.npz": "f6fd01d4ba30007525c77a9d079ce916",
    "reference/drupe/svhn_l1_n3.npz": "50da82bf100c797d62b42fcdcfd528da",
    "reference/drupe/stl10_l9_n3.npz": "16f5d19e91b2a8738ce7c89b7d863666",
    "reference/drupe/cifar10_l0_n3.npz": "b3b2d909d1391a1e06d4b843d2e4c2fb",
}
