"""Make the project root importable and keep the CPU thread count fixed for repeatable numbers."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random datasets in the npz layout: cifar10 (64/32 images, 10 classes) and gtsrb (48/30, 5),
    plus a reference file of label 1."""
    from datasets import save_split
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name, sizes, classes in (("cifar10", (64, 32), 10), ("gtsrb", (48, 30), 5)):
        for split, n in zip(("train", "test"), sizes):
            save_split(root / "data" / name / f"{split}.npz",
                       rng.integers(0, 200, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n))
    np.savez(root / "priority.npz", x=rng.integers(0, 200, (2, 32, 32, 3), dtype=np.uint8), y=np.array([1, 1]))
    return root
