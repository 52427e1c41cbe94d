"""Make the project root importable and keep the CPU thread count fixed for repeatable numbers."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
