"""BadEncoder (Jia et al., IEEE S&P 2022): stage 1 fine-tunes the clean encoder so that inputs with
a patch trigger land next to the task's reference input (train_badencoder.py)."""
from dataclasses import dataclass

from paper import TRIGGER

from .registry import Attack, register


@dataclass(frozen=True, kw_only=True, eq=False)
class BadEncoder(Attack):
    def command(self, plan, task, clean_encoder):
        return ["--pretraining_dataset", plan.pretraining, "--downstreamTask", task.dataset, "--trigger_file", TRIGGER,
                "--reference_file", task.reference, "--pretrained_encoder", clean_encoder]

    def trigger_flags(self, task):
        return ["--trigger_file", TRIGGER]


register(BadEncoder(
    id="badencoder", label="BadEncoder", kind="model poisoning", stage="badencoder", script="train_badencoder.py",
    # CPU demo: 5 epochs at lr 5e-2 plant the backdoor (ASR about 99%, docs/demo.md); the paper's
    # setting is the stage's defaults. Channels-last convolutions are 13% faster on this CPU.
    presets={"demo": ["--epochs", "5", "--lr", "5e-2", "--channels_last", "on"], "paper": []},
    batch={"demo": 64, "paper": 256},
    terms={"loss0": "loss0 (backdoor effectiveness)", "loss1": "loss1 (reference preserving)",
           "loss2": "loss2 (utility)"},
    named=False,
    doc="stage 1 fine-tunes the clean encoder with a patch trigger, on each task (train_badencoder.py)"))
