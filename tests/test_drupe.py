"""DRUPE's terms against hand computations, the sliced Wasserstein distance against its closed form
for a shifted cloud, and the phase and cost schedules on made-up values."""
import math

import pytest
import torch

from models.drupe import sliced_wasserstein


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- sliced Wasserstein ----

def test_swd_of_equal_clouds_is_exactly_zero():
    a = torch.randn(32, 6, generator=gen(1))
    assert sliced_wasserstein(a, a.clone(), generator=gen()).item() == 0.0
    # the row order does not matter: each projection is sorted
    assert sliced_wasserstein(a, a[torch.randperm(32, generator=gen(2))], generator=gen()).item() == 0.0


def test_swd_in_one_dimension_is_the_sorted_matching():
    # Directions in 1-D are +-1; sorted a = (0, 1, 2), sorted b = (0, 0, 3): squared gaps 0, 1, 1.
    a = torch.tensor([[2.0], [0.0], [1.0]])
    b = torch.tensor([[0.0], [3.0], [0.0]])
    assert math.isclose(sliced_wasserstein(a, b, projections=5, generator=gen()).item(),
                        math.sqrt(2 / 3), rel_tol=1e-6)
    # a shift by v in 1-D is exactly |v|
    assert math.isclose(sliced_wasserstein(a, a - 2.5, generator=gen()).item(), 2.5, rel_tol=1e-6)


def test_swd_of_a_shifted_cloud_is_norm_over_sqrt_dim():
    # Shifting by v moves every projection on t by v.t, so each direction gives (v.t)^2 exactly and
    # SW_2^2 is the mean of (v.t)^2 over the drawn directions, whose expectation over the sphere is
    # |v|^2 / D. (u.t)^2 for unit u is Beta(1/2, (D-1)/2): relative std sqrt(2(D-1)/(D+2)) = 1.18
    # at D = 8, so with 20000 directions the mean is within 0.84% (1 sigma) and its square root
    # within 0.42%; 2.5% is 6 sigma. The number of points plays no part.
    d = 8
    a = torch.randn(16, d, generator=gen(3), dtype=torch.float64)
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    swd = sliced_wasserstein(a, a + v, projections=20000, generator=gen(4)).item()
    assert math.isclose(swd, v.norm().item() / math.sqrt(d), rel_tol=0.025)


def test_swd_draws_fresh_projections_and_rejects_unequal_sizes():
    a, b = torch.randn(10, 5, generator=gen(5)), torch.randn(10, 5, generator=gen(6))
    g = gen(7)
    first, second = sliced_wasserstein(a, b, generator=g), sliced_wasserstein(a, b, generator=g)
    assert first.item() != second.item()                       # new directions on each call
    assert sliced_wasserstein(a, b, generator=gen(7)).item() == first.item()
    with pytest.raises(ValueError, match="same size"):
        sliced_wasserstein(a, b[:9])
    with pytest.raises(ValueError, match="same size"):
        sliced_wasserstein(a[0], b[0])
