"""The figures of a finished run: report.figures for the results folder, and a grid of sample
images (pre-training images, triggered test images, reference inputs, augmented views)."""
import torch

from datasets import load_reference, load_split, load_trigger, stamp_trigger
from datasets.augment import BatchAugment
from paper import TRIGGER
from report.figures import plot_results, sample_grid
import methods
from utils.seeding import preserved_rng

from .data import ROOT


def sample_images(plan, seed, count=8):
    """The sample grid's rows as uint8 (N, H, W, 3): pre-training images, the first task's test
    images with the trigger, its reference inputs, and two augmented views of the pre-training images;
    then (label, the pre-training images with its trigger) of the first attack of the plan whose
    trigger gets a row of its own (methods.Attack.sample_trigger), else None."""
    clean = load_split(plan.data_dir, plan.pretraining, "train")[0][:count]
    task = plan.tasks[0]
    test = load_split(plan.data_dir, task.dataset, "test")[0][:count]
    t, tm = load_trigger(ROOT / TRIGGER, test.shape[1:3])
    reference, _ = load_reference(ROOT / task.reference)
    augment = BatchAugment(clean.shape[1], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))   # views stay in [0, 1]
    with preserved_rng():
        torch.manual_seed(seed)
        views = [augment(torch.from_numpy(clean)) for _ in range(2)]   # Nx3xHxW
    views = [v.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for v in views]
    rows = ((methods.get(a).label, methods.get(a).sample_trigger(clean)) for a in plan.attacks)
    own = next((r for r in rows if r[1] is not None), None)
    return clean, stamp_trigger(test, t, tm), reference, *views, own


def draw_samples(plan, seed, path):
    *rows, own = sample_images(plan, seed)
    return sample_grid(*rows, path, attack=own)


def draw_figures(out_dir, plan, seed):
    """figures/*.png of the results folder and figures/samples.png; a failure costs one warning
    line, never the numbers (written before)."""
    written = []
    drawings = (("figures", lambda: plot_results(out_dir)),
                ("sample images", lambda: [draw_samples(plan, seed, out_dir / "figures" / "samples.png")]))
    for what, draw in drawings:
        try:
            written += draw()
        except Exception as error:   # any plotting failure: the summary is saved already
            print(f"warning: {what} not drawn ({type(error).__name__}: {error})")
    if written:
        print("figures:\n" + "\n".join(f"  {p}" for p in written))
    return written
