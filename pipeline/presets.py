"""The runner's presets: the stage flags of the CPU demo and of the paper's setting, as data.

Every stage runs at its own defaults unless a preset or --<stage>_args says otherwise; the demo's
sizes and timings are in docs/demo.md.
"""
from dataclasses import dataclass, field

from datasets import demo
from paper import TASKS

from .pretrained import DEMO_CLEAN


@dataclass(frozen=True)
class Preset:
    """pretraining: the dataset the encoders are pre-trained on; tasks: paper.Task-like
    (dataset, label, reference); the flags of stage 0 (clean), of every MIMIC.py student (mimic:
    MIMIC and its controls) and of stage 3 (downstream); global_batch: images per step of stage 0
    and of the students, shared among --nproc_per_node; ratio: the clean-data fraction of the
    defences and controls (the mimic flags give it; a --ratios sweep runs it in the folders of a
    run without --ratios, pipeline.plan); shipped_clean: a stage-0 encoder of this preset kept in
    the repository (pipeline/pretrained.py), used instead of training one. Every other method's
    flags and batch under a preset are in its module (methods/)."""
    pretraining: str
    tasks: tuple
    clean: list
    mimic: list
    downstream: list
    global_batch: dict = field(default_factory=dict)
    ratio: float = None
    shipped_clean: object = None


# CPU demo: small width and few images; stage 0 is the shipped pretrained/demo_clean.pth, made with
# the `clean` flags below (pipeline/pretrained.py; --train_clean runs them). Every defence reads the
# same clean subset, the first 4% of the pre-training images (240), the paper's share. MIMIC and its
# two controls train a fresh student for 200 epochs of 5 steps (1,000 steps: the curve of ACC and ASR
# against steps is in docs/demo.md); the baselines (methods/baselines.py) start from the suspect
# encoder and fine-tune it for 10 epochs. Batch 48: 240 images make whole batches, and 1% of the
# data still holds one.
# The downstream MLP trains for 200 epochs: at 100 (lr 2e-3) MIMIC's ASR on seed 100 was 25% instead
# of 1% (docs/demo.md). The training stages after stage 0 use channels-last convolutions, 13% faster
# on this CPU; stage 0 keeps the layout the shipped encoder was trained with.
_DEMO_RATIO = 0.04
_DEMO_SUBSET = ["--ratio", f"{_DEMO_RATIO:g}"]
_FAST = ["--channels_last", "on"]
DEMO = Preset(
    pretraining=demo.PRETRAIN_NAME,
    tasks=(demo.demo_task(),),
    clean=["--epochs", "10", "--width", "16", "--knn_freq", "5", "--lr", "3e-3"],
    mimic=[*_DEMO_SUBSET, "--epochs", "200", "--lr", "3e-3", "--mi_epochs", "60", *_FAST],
    downstream=["--nn_epochs", "200", "--lr", "1e-3", "--eval_freq", "10"],
    global_batch={"clean": 128, "mimic": 48},
    ratio=_DEMO_RATIO,
    shipped_clean=DEMO_CLEAN,
)

# The paper's settings (every stage at its defaults), one backdoor per downstream task; the
# defences at their own defaults on MIMIC's clean subset (4% of CIFAR-10).
_PAPER_RATIO = 0.04
_PAPER_SUBSET = ["--ratio", f"{_PAPER_RATIO:g}"]
PAPER = Preset(
    pretraining="cifar10",
    tasks=TASKS["cifar10"],
    clean=["--lr", "1e-3"],
    mimic=["--lr", "1e-2", "--epochs", "1000", *_PAPER_SUBSET],
    downstream=["--nn_epochs", "1000"],
    global_batch={"clean": 256, "mimic": 128},
    ratio=_PAPER_RATIO,
)

PRESETS = {"demo": DEMO, "paper": PAPER}
