"""How much of CTRL's trigger survives stage 0's augmentation: the figures behind docs/ctrl.md.

    python benchmarks/ctrl_survival.py                         # the demo's pre-training set
    python benchmarks/ctrl_survival.py --dataset cifar10 --n 2000

Triggers the first --n training images, augments each clean image and its triggered twin with the
same random draws (crop box, flip, jitter, grayscale), and prints, for stage 0's augmentation and
for variants with parts of it switched off, how far the triggered view's U and V DCT coefficients at
the trigger positions lie from the clean view's (root mean square; the stored images' shift is the
magnitude), beside the clean views' own spread there and the share of the trigger's pixel energy
left in the view. A horizontal flip negates these odd-frequency coefficients, so their mean is no
measure; the root mean square is. Runs on the CPU in seconds.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from datasets.augment import BatchAugment  # noqa: E402  (the repository root is importable only now)
from datasets.frequency import (CTRL_CHANNELS, CTRL_MAGNITUDE, CTRL_POSITIONS, CTRL_WINDOW,  # noqa: E402
                                dct2_windows, frequency_trigger, rgb_to_yuv)
from datasets.npz import load_split  # noqa: E402
from utils.cli import finite_float, positive_int, run_cli  # noqa: E402

VARIANTS = {   # name -> BatchAugment keywords (stage 0's augmentation is the first)
    "stage 0 (crop 0.08-1, flip, jitter, gray)": {},
    "crop 0.2-1 (CTRL's Kornia crop)": {"scale": (0.2, 1.0)},
    "crop 0.08-1 alone": {"jitter_p": 0.0, "gray_p": 0.0},
    "no crop (flip, jitter, gray)": {"crop": False},
    "flip alone": {"crop": False, "jitter_p": 0.0, "gray_p": 0.0},
}


def trigger_coefficients(x, window):
    """Nx3xHxW floats in [0, 1] -> N x (channels * positions) DCT coefficients at the trigger's spots."""
    coeffs = dct2_windows(rgb_to_yuv(x.double() * 255), window)
    return torch.stack([coeffs[:, c, r, k] for c in CTRL_CHANNELS for r, k in CTRL_POSITIONS], dim=1)


def survival(x, magnitude=CTRL_MAGNITUDE):
    """uint8 NxHxWx3 images -> {view: (trigger shift rms, clean spread, share of pixel energy left)},
    "stored images" first, then each of VARIANTS (torch's global generator draws the augmentations)."""
    clean = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    triggered = torch.from_numpy(frequency_trigger(x, magnitude, CTRL_WINDOW)).permute(0, 3, 1, 2).float() / 255
    stored_energy = (triggered - clean).pow(2).sum((1, 2, 3)).mean()
    rows = {}
    for name, keywords in {"stored images": None, **VARIANTS}.items():
        if keywords is None:
            view_clean, view_triggered = clean, triggered
        else:
            augment = BatchAugment(x.shape[1], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), **keywords)
            params = augment.sample(len(x), x.shape[1], x.shape[2])
            view_clean, view_triggered = augment(clean.clone(), params), augment(triggered.clone(), params)
        coeff_clean = trigger_coefficients(view_clean, CTRL_WINDOW)
        shift = trigger_coefficients(view_triggered, CTRL_WINDOW) - coeff_clean
        energy = (view_triggered - view_clean).pow(2).sum((1, 2, 3)).mean() / stored_energy
        rows[name] = (float(shift.pow(2).mean().sqrt()), float(coeff_clean.std(0).mean()), float(energy))
    return rows


def main(args):
    torch.manual_seed(args.seed)
    x, _ = load_split(args.data_dir, args.dataset, "train")
    x = x[:args.n]
    print(f"{len(x)} images of {args.dataset}, magnitude {args.magnitude:g}, window {CTRL_WINDOW}, "
          f"positions {list(CTRL_POSITIONS)} of U and V")
    print(f"{'view':44s} {'trigger shift (rms)':>20s} {'clean spread (std)':>19s} {'pixel energy left':>18s}")
    for name, (shift, spread, energy) in survival(x, args.magnitude).items():
        print(f"{name:44s} {shift:20.1f} {spread:19.1f} {100 * energy:17.0f}%")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo_pretrain", help="a training split under --data_dir")
    parser.add_argument("--data_dir", default=str(ROOT / "data"))
    parser.add_argument("--n", type=positive_int, default=1000, help="images to trigger and augment")
    parser.add_argument("--magnitude", type=finite_float, default=CTRL_MAGNITUDE)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser())
