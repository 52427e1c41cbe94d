"""Mutual information by the Donsker-Varadhan lower bound (MINE), and MI-guided layer weights.

MIMIC trains one statistics network per encoder block on activations computed once: the
encoder is frozen, so the estimator never runs it again.
"""
import math

import torch
import torch.nn as nn

from utils.logs import progress


class StatisticsNetwork(nn.Module):
    """T(a, z) = Linear(da+dz, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, 1).

    The first layer is stored as two blocks (one on a, one on z); their sum is exactly a Linear
    on the concatenation, and it lets the joint and the shuffled (marginal) pairs share the
    product with the large a-block.
    """

    def __init__(self, dim_a, dim_z, hidden=512):
        super().__init__()
        self.fc_a = nn.Linear(dim_a, hidden)
        self.fc_z = nn.Linear(dim_z, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, a, z, perm):
        """a: BxDa, z: BxDz, perm: B indices -> (T(a_i, z_i), T(a_i, z_perm(i))), each B."""
        ha, hz = self.fc_a(a), self.fc_z(z)
        joint = self.rest(ha + hz).squeeze(-1)
        marginal = self.rest(ha + hz[perm]).squeeze(-1)
        return joint, marginal


def dv_bound(t_joint, t_marginal):
    """Donsker-Varadhan bound: mean T(joint) - log mean exp T(marginal)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, dim=0) - math.log(t_marginal.numel()))


@torch.no_grad()
def evaluate_bound(net, a, z, generator, chunk=1024):
    """The DV bound over all of (a, z), the marginal pairs drawn by one random permutation."""
    perm = torch.randperm(len(a), generator=generator).to(a.device)
    joint, marginal = [], []
    for s in range(0, len(a), chunk):
        idx = torch.arange(s, min(s + chunk, len(a)), device=a.device)
        ha = net.fc_a(a[idx])
        joint.append(net.rest(ha + net.fc_z(z[idx])).squeeze(-1))
        marginal.append(net.rest(ha + net.fc_z(z[perm[idx]])).squeeze(-1))
    return dv_bound(torch.cat(joint), torch.cat(marginal)).item()


def estimate_mi(a, z, epochs=200, batch_size=128, lr=1e-3, weight_decay=1e-5, hidden=512,
                average_last=10, seed=0, desc="MI"):
    """Estimate I(a; z) in nats from paired samples a: NxDa, z: NxDz (on any device).

    Trains a statistics network for `epochs` passes over the samples; after each epoch the bound
    is evaluated over all samples, negative or NaN values counting as 0. Returns (mi, history),
    mi being the mean of the last `average_last` epochs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = StatisticsNetwork(a.shape[1], z.shape[1], hidden).to(a.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(a)
    batch_size = min(batch_size, n)
    history = []
    for _ in progress(range(epochs), desc=desc):
        order = torch.randperm(n, generator=generator).to(a.device)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            perm = torch.randperm(batch_size, generator=generator).to(a.device)
            joint, marginal = net(a[idx], z[idx], perm)
            loss = -dv_bound(joint, marginal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        value = evaluate_bound(net, a, z, generator)
        history.append(value if math.isfinite(value) and value > 0 else 0.0)
    tail = history[-average_last:] if history else [0.0]
    return sum(tail) / len(tail), history


def mi_to_weights(mi, base, scale=10000.0):
    """Attention-transfer weight per block: base_l + scale * MI_l / sum(MI); equal shares if all 0."""
    total = sum(mi)
    shares = [m / total for m in mi] if total > 0 else [1.0 / len(mi)] * len(mi)
    return [b + scale * s for b, s in zip(base, shares)]
