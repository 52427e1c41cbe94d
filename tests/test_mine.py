"""The DV estimator recovers a known mutual information (also from badly scaled inputs, once
standardised); the authors' per-batch evaluation, the held-out split, the fixed evaluation
permutations, the learning-rate schedule, the convergence verdict and its warnings on hand cases;
MI becomes layer weights by the paper's rule."""
import math

import torch

from models import convergence, estimate_mi, mi_to_weights, mi_warnings
from models import mine
from models.mine import (EVAL_PERMUTATIONS, MISettings, StatisticsNetwork, apply_standardization, dv_bound, evaluate_bound,
                         evaluate_bound_per_batch, holdout_split, standardization_stats)


def estimate(a, z, batch_size=128, return_report=False, **options):
    """estimate_mi with the MISettings given as keywords."""
    return estimate_mi(a, z, MISettings(**options), batch_size, return_report=return_report)


def gaussian_pair(n, d, rho, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g)
    return x, y


def test_recovers_mi_of_correlated_gaussians():
    """I(X;Y) = -d/2 log(1 - rho^2) for d independent pairs of correlation rho; within 0.15 nats."""
    for d, rho in ((2, 0.8), (4, 0.6)):
        x, y = gaussian_pair(4000, d, rho, seed=1)
        mi, history = estimate(x, y, epochs=40, batch_size=128, hidden=128, seed=0)
        truth = -d / 2 * math.log(1 - rho ** 2)
        assert abs(mi - truth) < 0.15, (d, rho, mi, truth)
        assert len(history) == 40 and all(v >= 0 for v in history)


def test_independent_variables_give_near_zero():
    x, _ = gaussian_pair(4000, 3, 0.0, seed=2)
    _, y = gaussian_pair(4000, 3, 0.0, seed=3)
    mi, _ = estimate(x, y, epochs=20, batch_size=128, hidden=128, seed=0)
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


class ScalarNet:
    """A stand-in statistics network: T(joint)_i = a_i, T(marginal)_i = z_perm(i) (first columns).

    A batch's DV bound is then mean(a) - log mean exp(z) whatever the permutation, so the
    expected values follow by hand. It records each permutation it is given.
    """

    def __init__(self):
        self.perms = []

    def __call__(self, a, z, perm):
        self.perms.append(sorted(perm.tolist()))
        return a[:, 0], z[perm, 0]


def test_per_batch_evaluation_hand_case():
    """Batches in data order, permuted within, each clipped at 0, partial last batch one batch."""
    a = torch.tensor([1.0, 3.0, 0.0, 0.0, float("nan"), 1.0, 5.0]).unsqueeze(1)
    z = torch.tensor([0.0, math.log(3.0), 2.0, 2.0, 0.0, 0.0, 1.0]).unsqueeze(1)
    net = ScalarNet()
    value = evaluate_bound_per_batch(net, a, z, batch_size=2, generator=torch.Generator().manual_seed(0))
    batches = [2.0 - math.log(2.0),    # mean(1, 3) - log mean(e^0, e^log 3)
               0.0,                    # 0 - 2 = -2, clipped
               0.0,                    # NaN, clipped
               4.0]                    # partial batch: 5 - 1
    assert math.isclose(value, sum(batches) / 4, abs_tol=1e-6)
    assert net.perms == [[0, 1], [0, 1], [0, 1], [0]]


def test_per_batch_option_is_used_once_per_epoch(monkeypatch):
    calls = []
    real = mine.evaluate_bound_per_batch
    monkeypatch.setattr(mine, "evaluate_bound_per_batch",
                        lambda net, a, z, batch_size, generator: calls.append(batch_size) or real(
                            net, a, z, batch_size, generator))
    x, y = gaussian_pair(100, 2, 0.8, seed=4)
    _, history = estimate(x, y, epochs=3, batch_size=32, hidden=16, evaluation="per_batch")
    assert calls == [32, 32, 32] and len(history) == 3


def test_standardization_stats_hand_case():
    x = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 4.0]])
    mean, scale = standardization_stats(x, "feature")
    assert mean.tolist() == [2.0, 5.0, 2.0] and scale.tolist() == [1.0, 1.0, 2.0]   # constant column: scale 1
    assert apply_standardization(x, mean, scale).tolist() == [[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]]
    mean, scale = standardization_stats(x, "global")
    assert mean.tolist() == [2.0, 5.0, 2.0]
    assert torch.allclose(scale, torch.full((3,), math.sqrt(5 / 3)))                  # sqrt(mean(1, 0, 4))


def test_standardization_recovers_mi_of_scaled_inputs():
    """x1000 + 500 leaves MI unchanged; standardised it is recovered as in the unscaled test, raw it is not."""
    d, rho = 2, 0.8
    x, y = gaussian_pair(4000, d, rho, seed=1)
    x, y = 1000 * x + 500, 1000 * y + 500
    truth = -d / 2 * math.log(1 - rho ** 2)
    mi, _, report = estimate(x, y, epochs=40, batch_size=128, hidden=128, seed=0, return_report=True)
    assert abs(mi - truth) < 0.15 and report["converged"], (mi, truth, report)
    raw, _, report = estimate(x, y, epochs=40, batch_size=128, hidden=128, seed=0, standardize="none",
                                 return_report=True)
    assert abs(raw - truth) > 0.15 and not report["converged"], (raw, truth, report)


def test_standardization_statistics_computed_once(monkeypatch):
    shapes = []
    real = mine.standardization_stats
    monkeypatch.setattr(mine, "standardization_stats",
                        lambda x, mode: shapes.append(tuple(x.shape)) or real(x, mode))
    x, y = gaussian_pair(100, 3, 0.5, seed=4)
    estimate(x, y[:, :2], epochs=4, batch_size=32, hidden=16)
    assert shapes == [(100, 3), (100, 2)]                      # once per input over 4 epochs
    shapes.clear()
    estimate(x, y, epochs=2, batch_size=32, hidden=16, standardize="none")
    assert shapes == []


def test_convergence_verdicts():
    """The last 10 epochs against the 10 up to the half-way epoch, then the line and the noise of the last 10."""
    rising = convergence([0.1 * i for i in range(1, 21)])
    # last window 1.1..2.0 (mean 1.55), window ending at epoch 10: 0.1..1.0 (mean 0.55)
    assert rising["reason"] == "rising" and not rising["converged"] and rising["halfway"] == 10
    assert math.isclose(rising["change"], 1.0 / 1.55) and math.isclose(rising["slope"], 0.9 / 1.55)
    assert math.isclose(rising["spread"], 0.0, abs_tol=1e-9)
    settled = convergence([0.1] + [0.5] * 19)                 # earlier window mean 0.46: change 0.08
    assert settled["reason"] == "converged" and math.isclose(settled["change"], 0.08)
    assert settled["slope"] == 0.0 and settled["spread"] == 0.0
    assert convergence([0.1, 0.3] + [0.5] * 18)["reason"] == "rising"     # earlier mean 0.44: change 0.12
    noisy = convergence([0.5] * 10 + [0.2, 0.8, 0.2, 0.8, 0.5, 0.5, 0.8, 0.2, 0.8, 0.2])
    # same mean as before, symmetric: slope 0; residuals +-0.3 on 8 of 10 epochs -> std sqrt(0.072), level 0.5
    assert noisy["reason"] == "noisy" and math.isclose(noisy["spread"], math.sqrt(0.072) / 0.5)
    near_zero = convergence([0.0, 0.01] * 10)
    # mean 0.005 < floor 0.05: judged against 0.05 nats, the small wobble passes
    assert near_zero["converged"] and near_zero["spread"] < 0.11
    zero = convergence([0.0] * 30)
    assert zero["reason"] == "zero" and not zero["converged"] and zero["change"] == 0.0
    assert convergence([1.0] * 19) == {"converged": False, "reason": "too few epochs", "change": None,
                                       "slope": None, "spread": None, "window": 10, "halfway": 9}


def test_a_curve_flattened_by_the_schedule_is_not_converged():
    """A bound that climbs until the rate vanishes and is flat over the last 10 epochs (slope 0) still
    moved between the half-way window and the end: rising, not converged."""
    history = [0.2 * e for e in range(1, 21)] + [4.0] * 10     # 30 epochs, halfway 15
    report = convergence(history)
    assert report["slope"] == 0.0 and report["spread"] == 0.0
    assert report["reason"] == "rising" and math.isclose(report["change"], (4.0 - 2.1) / 4.0)


def test_an_estimator_stopped_while_rising_is_not_converged():
    """A few epochs, annealed to 0: the last epochs are flat only because the rate is 0."""
    x, y = gaussian_pair(4000, 4, 0.6, seed=1)
    _, history, report = estimate(x, y, epochs=20, hidden=128, lr=2e-4, seed=0, return_report=True)
    assert history[-1] > history[9], history
    assert report["reason"] == "rising" and not report["converged"], report


def test_mi_warnings_text():
    blocks = ["layer1", "layer2", "layer3"]
    reports = [convergence([0.1 * i for i in range(1, 21)]), convergence([0.5] * 20), convergence([0.5] * 4)]
    assert mi_warnings(blocks, [1.55, 0.5, 0.5], reports) == [
        "MI of layer1 (1.55 nats) has not converged (rising: the mean of the last 10 epochs differs from that "
        "of epochs 1-10 by +0.65 of the level; over the last 10 epochs change +0.58, spread 0.00); raise "
        "--mi_epochs",
        "MI of layer3 (0.5 nats) has not converged (too few epochs: fewer than 20, the last 10 are compared "
        "with the 10 up to the half-way epoch); raise --mi_epochs"]
    zero = convergence([0.0] * 20)
    assert mi_warnings(blocks[:2], [0.0, 0.0], [zero, zero]) == [
        "MI of layer1 (0 nats) has not converged (zero: the bound was 0 in each of the last 10 epochs); "
        "raise --mi_epochs or --mi_lr, or check the teacher",
        "MI of layer2 (0 nats) has not converged (zero: the bound was 0 in each of the last 10 epochs); "
        "raise --mi_epochs or --mi_lr, or check the teacher",
        "every block's MI is 0: the attention weights fall back to uniform shares (MIMIC then equals "
        "--attention uniform); raise --mi_epochs or --mi_lr, or check the teacher"]
    assert mi_warnings(blocks[:2], [0.5, 0.5], [reports[1], reports[1]]) == []


def test_holdout_split():
    train, held = holdout_split(100, 0.2, seed=7)
    assert len(held) == 20 and len(train) == 80
    assert sorted(set(train.tolist()) | set(held.tolist())) == list(range(100))     # disjoint, complete
    assert train.tolist() == sorted(train.tolist()) and held.tolist() == sorted(held.tolist())
    assert torch.equal(held, holdout_split(100, 0.2, seed=7)[1])                       # seeded
    assert not torch.equal(held, holdout_split(100, 0.2, seed=8)[1])
    every, same = holdout_split(10, 0.0, seed=7)
    assert every.tolist() == same.tolist() == list(range(10))                          # the authors' way


class RecordingNetwork(StatisticsNetwork):
    """Remembers the first input rows of every training batch (by their value: row i holds i)."""
    seen = []

    def forward(self, a, z, perm):
        if torch.is_grad_enabled():
            RecordingNetwork.seen.extend(a[:, 0].round().long().tolist())
        return super().forward(a, z, perm)


def test_statistics_network_never_trains_on_held_out_samples_which_are_evaluated(monkeypatch):
    n = 50
    a = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.randn(n, 2)], dim=1)
    z = torch.randn(n, 2)
    RecordingNetwork.seen = []
    evaluated = []
    monkeypatch.setattr(mine, "StatisticsNetwork", RecordingNetwork)
    monkeypatch.setattr(mine, "evaluate_bound", lambda net, a_e, z_e, perms: evaluated.append(
        (a_e[:, 0].round().long().tolist(), len(perms))) or 0.5)
    estimate(a, z, epochs=3, batch_size=8, hidden=8, seed=3, standardize="none", holdout=0.2)
    train, held = holdout_split(n, 0.2, seed=3)
    assert set(RecordingNetwork.seen) == set(train.tolist())                   # 40 = 5 full batches of 8
    assert evaluated == [(held.tolist(), EVAL_PERMUTATIONS)] * 3               # every epoch, held-out only


def test_global_evaluation_averages_fixed_permutations():
    a = torch.tensor([1.0, 3.0, 0.0]).unsqueeze(1)
    z = torch.tensor([0.0, 1.0, 2.0]).unsqueeze(1)
    net = StatisticsNetwork(1, 1, hidden=4)
    perms = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    with torch.no_grad():
        joint, first = net(a, z, perms[0])
        _, second = net(a, z, perms[1])
        expected = (dv_bound(joint, first).item() + dv_bound(joint, second).item()) / 2
    assert math.isclose(evaluate_bound(net, a, z, perms), expected, rel_tol=1e-6)


class RecordingAdam(torch.optim.Adam):
    lrs = []

    def step(self, closure=None):
        RecordingAdam.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_learning_rate_schedules(monkeypatch):
    monkeypatch.setattr(mine.torch.optim, "Adam", RecordingAdam)
    x, y = gaussian_pair(64, 2, 0.5, seed=5)
    epochs, lr = 4, 1e-3
    RecordingAdam.lrs = []
    estimate(x, y, epochs=epochs, batch_size=32, hidden=8, lr=lr, holdout=0.0, schedule="constant")
    assert RecordingAdam.lrs == [lr] * 2 * epochs
    RecordingAdam.lrs = []
    estimate(x, y, epochs=epochs, batch_size=32, hidden=8, lr=lr, holdout=0.0, schedule="cosine")
    per_epoch = RecordingAdam.lrs[::2]                 # two steps per epoch, one rate per epoch
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]   # 1e-3 ... 1.5e-4
    assert all(math.isclose(got, want, rel_tol=1e-9) for got, want in zip(per_epoch, expected))


def test_dv_bound_is_the_authors_log_mean_exp_without_its_overflow():
    """The authors compute log(mean(exp(T))) directly; dv_bound uses log-sum-exp. Where exp does
    not overflow the two agree to float32 rounding; at T = 100 exp overflows float32 to inf and
    their form gives -inf (counted as 0), ours the exact value."""
    joint = torch.tensor([1.0, 2.0, 3.0, 4.0])
    marginal = torch.tensor([0.5, -1.0, 2.0, 0.0])
    naive = joint.mean() - torch.log(torch.exp(marginal).mean())
    assert torch.allclose(dv_bound(joint, marginal), naive, rtol=1e-6)
    big = marginal + 100.0
    assert torch.isinf(joint.mean() - torch.log(torch.exp(big).mean()))
    exact = joint.double().mean() - (100.0 + torch.log(torch.exp(marginal.double()).mean()))
    assert math.isclose(dv_bound(joint, big).item(), exact.item(), rel_tol=1e-5)


def test_converged_means_under_10_percent_over_the_second_half_not_settled_for_good():
    """What the verdict can and cannot see (models/mine.py, CHANGE_TOL): 60 epochs whose estimate
    is flat over epochs 21-30, climbs over epochs 31-50 and is then frozen, as under the annealed
    rate. A climb of 8% of the level over the second half reads converged although a longer run
    might climb on; 12% reads rising; the last window is flat either way (slope and spread 0)."""
    for climb, reason in ((0.08, "converged"), (0.12, "rising")):
        start = 1.0 - climb
        history = ([start * e / 20 for e in range(1, 21)] + [start] * 10 + [start + climb * e / 20 for e in range(1, 21)]
                   + [1.0] * 10)
        report = convergence(history)
        assert report["reason"] == reason and report["slope"] == 0.0 and report["spread"] == 0.0
        assert math.isclose(report["change"], climb)
