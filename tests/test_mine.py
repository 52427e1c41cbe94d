"""The DV estimator recovers a known mutual information; MI becomes layer weights by the paper's rule."""
import math

import torch

from models import estimate_mi, mi_to_weights
from models.mine import StatisticsNetwork, dv_bound


def gaussian_pair(n, d, rho, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g)
    return x, y


def test_recovers_mi_of_correlated_gaussians():
    """I(X;Y) = -d/2 log(1 - rho^2) for d independent pairs of correlation rho; within 0.15 nats."""
    for d, rho in ((2, 0.8), (4, 0.6)):
        x, y = gaussian_pair(4000, d, rho, seed=1)
        mi, history = estimate_mi(x, y, epochs=40, batch_size=128, hidden=128, seed=0)
        truth = -d / 2 * math.log(1 - rho ** 2)
        assert abs(mi - truth) < 0.15, (d, rho, mi, truth)
        assert len(history) == 40 and all(v >= 0 for v in history)


def test_independent_variables_give_near_zero():
    x, _ = gaussian_pair(4000, 3, 0.0, seed=2)
    _, y = gaussian_pair(4000, 3, 0.0, seed=3)
    mi, _ = estimate_mi(x, y, epochs=20, batch_size=128, hidden=128, seed=0)
    assert 0 <= mi < 0.08


def test_split_first_layer_equals_linear_on_concatenation():
    net = StatisticsNetwork(5, 3, hidden=16)
    a, z = torch.randn(7, 5), torch.randn(7, 3)
    perm = torch.randperm(7)
    joint, marginal = net(a, z, perm)
    concat = torch.nn.Linear(8, 16)
    with torch.no_grad():
        concat.weight.copy_(torch.cat([net.fc_a.weight, net.fc_z.weight], dim=1))
        concat.bias.copy_(net.fc_a.bias)
    assert torch.allclose(joint, net.rest(concat(torch.cat([a, z], 1))).squeeze(-1), atol=1e-6)
    assert torch.allclose(marginal, net.rest(concat(torch.cat([a, z[perm]], 1))).squeeze(-1), atol=1e-6)


def test_dv_bound_hand_case():
    joint, marginal = torch.tensor([1.0, 3.0]), torch.tensor([0.0, math.log(3.0)])
    assert math.isclose(dv_bound(joint, marginal).item(), 2.0 - math.log(2.0), rel_tol=1e-6)


def test_mi_to_weights_rule_and_all_zero_case():
    base = [1000.0] * 4
    assert mi_to_weights([0.1, 0.3, 0.4, 0.2], base) == [2000.0, 4000.0, 5000.0, 3000.0]
    assert mi_to_weights([0.0] * 4, base) == [3500.0] * 4
    assert mi_to_weights([0.0, 0.0, 2.0, 0.0], [0.0, 10.0, 0.0, 0.0], scale=100.0) == [0.0, 10.0, 100.0, 0.0]
