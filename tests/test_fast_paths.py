"""The bfloat16 autocast path (on by default on CUDA) gives the float32 losses on a fixed batch."""
import torch

from models.distill import distill_step
from models import SimCLR


def test_bf16_autocast_distill_step_matches_fp32():
    torch.manual_seed(0)
    student, teacher = SimCLR(width=8), SimCLR(width=8).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)       # leave the weights as they are
    v1, v2 = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    weights = [2000.0, 3000.0, 4000.0, 5000.0]
    fp32 = distill_step(student, teacher, v1, v2, optimizer, weights, 1.0, 0.5, amp=False)
    bf16 = distill_step(student, teacher, v1, v2, optimizer, weights, 1.0, 0.5, amp=True)
    # bfloat16 keeps 8 bits of mantissa: agreement to 2% on each term is what it can give.
    for key in ("loss", "nce", "at", "clone"):
        assert torch.isclose(bf16[key], fp32[key], rtol=2e-2, atol=1e-3), (key, bf16[key], fp32[key])
    assert fp32["at"] > 0 and bf16["loss"].dtype == torch.float32
