"""The baseline defences of defenses.py, each fine-tuning the suspect encoder on the clean subset:
FT (fine-tuning), FP (fine-pruning) and NAD (neural attention distillation)."""
from dataclasses import dataclass

from .registry import Defence, register


@dataclass(frozen=True, kw_only=True, eq=False)
class Baseline(Defence):
    """defenses.py --defense <id>; every baseline reads the clean subset at the preset's fraction."""

    def preset_flags(self, plan):
        return ["--ratio", f"{plan.preset.ratio:g}", *super().preset_flags(plan)]

    def command(self, plan, suspect):
        return ["--defense", self.id, "--suspect", suspect, "--pretraining_dataset", plan.pretraining]


# CPU demo: 10 epochs at lr 1e-3 of 5 steps (batch 48 on the 240 images of the subset); the
# paper's setting is the stage's defaults. NAD's teacher is a shorter fine-tuning run on the same subset.
_DEMO = ["--epochs", "10", "--lr", "1e-3", "--channels_last", "on"]
_BASELINE = dict(stage="defense", script="defenses.py", batch={"demo": 48, "paper": 128})
register(Baseline(id="finetune", label="FT", presets={"demo": _DEMO, "paper": []},
                             doc="fine-tuning on the clean subset (defenses.py)", **_BASELINE))
register(Baseline(id="fine_pruning", label="FP", presets={"demo": _DEMO, "paper": []},
                                 doc="fine-pruning: prune the least active channels, then fine-tune", **_BASELINE))
register(Baseline(id="nad", label="NAD", presets={"demo": [*_DEMO, "--nad_teacher_epochs", "5"], "paper": []},
                        doc="neural attention distillation from a fine-tuned teacher", **_BASELINE))
