"""CTRL (Li et al., "An Embarrassingly Simple Backdoor Attack on Self-supervised Learning", ICCV
2023): poisons a share of the pre-training images of its target class with a frequency-domain
trigger and trains stage 0 on that copy; it is evaluated on the pre-training dataset itself, at
its target class (docs/ctrl.md)."""
from dataclasses import dataclass

from datasets import FrequencyTrigger
from datasets.npz import npz_shape, split_path
from datasets.poison import CTRL_POISON_RATIO, POISON_RECORD, poison_ctrl
from paper import Task
from utils.cli import fraction, nonnegative_int

from .registry import Attack, register

CTRL_TARGET = 0         # its own CIFAR-10 -> CIFAR-10 setting: class 0


def poison_name(pretraining, target, ratio, trigger):
    """The poisoned copy's dataset name, which spells its settings, so runs with other settings
    sharing a --data_dir never rewrite each other's copy: e.g. demo_pretrain_ctrl_t0_p0.01_m100_w32."""
    return f"{pretraining}_ctrl_t{target}_p{ratio:g}_m{trigger.magnitude:g}_w{trigger.window_size}"


def poison_data(pretraining, target, ratio, data_dir):
    """CTRL's poisoned copy of the pre-training data, <data_dir>/<poison_name(...)> (kept when it is
    already the one asked for); returns its name."""
    trigger = FrequencyTrigger(image_size=tuple(npz_shape(split_path(data_dir, pretraining, "train"), "x")[1:3]))
    name = poison_name(pretraining, target, ratio, trigger)
    record = poison_ctrl(data_dir, pretraining, name, target, ratio, trigger)
    print(f"CTRL's poisoned data {data_dir / name}: {record['poisoned']} of {record['images']} images of class "
          f"{target} triggered ({record['status']}; indices in {POISON_RECORD})")
    return name


@dataclass(frozen=True, kw_only=True, eq=False)
class Ctrl(Attack):
    def add_runner_args(self, parser):
        parser.add_argument("--ctrl_target", type=nonnegative_int, default=CTRL_TARGET,
                            help=f"CTRL's target class in the pre-training dataset (default: {CTRL_TARGET}, CTRL's)")
        parser.add_argument("--ctrl_poison_ratio", type=fraction, default=CTRL_POISON_RATIO,
                            help=f"share of the pre-training images CTRL poisons, all of the target class "
                                 f"(default: {CTRL_POISON_RATIO}, CTRL's)")

    def tasks(self, plan):
        """Its one task: the pre-training dataset itself at the target class (no reference file)."""
        return [Task(plan.pretraining, plan.pretraining, plan.options.get("ctrl_target", CTRL_TARGET), None)]

    def prepare(self, plan):
        """The poisoned copy's dataset name."""
        ratio = plan.options.get("ctrl_poison_ratio", CTRL_POISON_RATIO)
        return poison_data(plan.pretraining, self.tasks(plan)[0].label, ratio, plan.data_path)

    def reads_clean(self):
        return False

    def preset_flags(self, plan):
        return list(plan.preset.clean)          # stage 0, as the clean encoder is trained

    def global_batch(self, plan):
        return plan.preset.global_batch["clean"]

    def command(self, plan, task, clean_encoder):
        return ["--pretraining_dataset", plan.prepared[self.id], "--encoder_usage", plan.pretraining]

    def inputs(self, plan, task):
        # The poisoned copy is an input file: rewritten with other data or settings, it trains anew.
        return (f"{plan.data_dir}/{plan.prepared[self.id]}/train.npz",)

    def trigger_flags(self, task):
        return ["--trigger", self.id]

    def job_name(self, task):
        return f"stage 0 on CTRL's poisoned data ({task.dataset})"

    def sample_trigger(self, images):
        return FrequencyTrigger(image_size=images.shape[1:3]).apply(images)


register(Ctrl(
    id="ctrl", label="CTRL", kind="data poisoning", stage="clean", script="train_clean_encoder.py",
    doc="stage 0 on a copy of the pre-training data with a frequency trigger on a share of the target "
        "class's images, evaluated on the pre-training dataset (train_clean_encoder.py, docs/ctrl.md)"))
