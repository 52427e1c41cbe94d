"""DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023): a detection
defence. detect.py searches for the smallest trigger that makes the frozen encoder embed every
shadow image alike; a small one (PL1, its mask's share of the image, below the threshold) flags
the encoder as backdoored (docs/decree.md)."""
from dataclasses import dataclass

from .registry import Detector, register


@dataclass(frozen=True, kw_only=True, eq=False)
class Decree(Detector):
    def command(self, plan, encoder):
        return ["--encoder", encoder, "--pretraining_dataset", plan.pretraining]


register(Decree(
    id="decree", label="DECREE", stage="detect", script="detect.py", score="pl1", score_label="PL1",
    # CPU demo: 100 shadow images per class (the authors' 10% of the demo's test split would hold
    # less than one batch), at most 100 epochs (every measured search stopped by epoch 17;
    # docs/decree.md); the paper's setting is the stage's defaults.
    presets={"demo": ["--shadow_per_class", "100", "--epochs", "100"], "paper": []},
    doc="DECREE's trigger search: flags an encoder whose smallest all-alike trigger is small (detect.py)"))
