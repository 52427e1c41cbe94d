"""The feature spread (models.health.feature_spread) of fresh and trained encoders on images and
on Gaussian noise, at 32, 96 and 224 px: the measurements behind models.health.MIN_SPREAD.

    python -m datasets.demo --data_dir /tmp/demo          # the demo's data, once
    python benchmarks/spreads.py --data_dir /tmp/demo

Images: the first 32 of demo_pretrain's train split (the probe batch a stage passes), scaled
bilinearly to each size after the test transform. Noise: 32 standard-normal images, the probe
the guard used before. Fresh encoders: ResNet-18 at widths 16 and 64, both inits, seeds 0-2
(width 64 at seed 0 only). Trained: the shipped demo encoder (pretrained/demo_clean.pth).
Prints one line per encoder and size and writes the table as JSON (--out).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import load_split  # noqa: E402
from datasets.loader import to_input  # noqa: E402
from models import SimCLR, load_encoder  # noqa: E402
from models.health import PROBE_IMAGES, feature_spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = (32, 96, 224)


@torch.no_grad()
def spread(model, x):
    model.eval()
    return feature_spread(model(x)[0])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="folder holding demo_pretrain/train.npz")
    parser.add_argument("--out", default="output/spreads.json", help="JSON output (default: output/spreads.json)")
    args = parser.parse_args()
    trained, ckpt = load_encoder(ROOT / "pretrained/demo_clean.pth")
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    images = to_input(load_split(args.data_dir, "demo_pretrain", "train")[0][:PROBE_IMAGES], mean, std, "cpu")
    encoders = [("trained demo_clean (width 16)", trained)]
    for width, seeds in ((16, (0, 1, 2)), (64, (0,))):
        for init in ("torchvision", "pytorch"):
            for seed in seeds:
                torch.manual_seed(seed)
                encoders.append((f"fresh width {width} {init} seed {seed}", SimCLR(width=width, init=init)))
    rows = []
    for size in SIZES:
        data = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        noise = torch.randn(PROBE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
        for name, model in encoders:
            row = {"encoder": name, "size": size, "data": spread(model, data), "noise": spread(model, noise)}
            print(f"{size:4d} px  {name:40s} data {row['data']:.3g}  noise {row['noise']:.3g}", flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
