"""Mutual information by the Donsker-Varadhan lower bound (MINE), and MI-guided layer weights.

MIMIC trains one statistics network per encoder block on activations computed once: the
encoder is frozen, so the estimator never runs it again. Every option of the estimator and its
default is defined once, in `MISettings` (MIMIC.py's --mi_* flags take their defaults from it);
`AUTHORS` is the authors' setting. Besides the estimate, this module judges whether the
estimator's per-epoch history has settled (`convergence`) and turns those verdicts into one-line
warnings for the log (`mi_warnings`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.logs import progress

STANDARDIZATIONS = ("feature", "global", "none")
EVALUATIONS = ("global", "per_batch")
SCHEDULES = ("cosine", "constant")
ORDERS = ("shuffled", "ordered")
FIRST_LAYERS = ("split", "joint")

# The "global" evaluation averages the DV bound over this many permutations of the evaluated
# samples, drawn once: fixed marginal pairs keep a fresh permutation's noise out of the
# epoch-to-epoch history, and averaging several keeps one permutation's luck out of the level.
EVAL_PERMUTATIONS = 8

# A feature whose std over the samples is below this fraction of the largest feature std is
# treated as constant and only centred: dividing by a (near-)zero std would blow rounding noise
# up to unit variance. Relative, so that the rule does not depend on the inputs' units.
CONSTANT_FEATURE_TOL = 1e-6

# Convergence verdict (see `convergence`). Every measure is relative to the level, the mean MI of
# the last CONVERGENCE_WINDOW epochs (the same count MI is averaged over by default), floored at
# MI_FLOOR nats so that an estimate hovering near 0 is judged by absolute changes rather than by
# a ratio that explodes.
# CHANGE_TOL: the mean of the last window may differ from the mean of the window that ends at the
# half-way epoch by at most 10% of the level. Of the three measures, the schedule weakens this one
# least: at the half-way epoch the cosine schedule still runs at half the initial rate, so an
# estimate still climbing then shows the climb. What no measure here can see is how far the
# estimate would move with more epochs: the annealed rate freezes the network, so under the cosine
# default the last window is flat by construction (it trains at under 7% of the initial rate over
# 60 epochs, under 1% over 200) and SLOPE_TOL and SPREAD_TOL then mostly confirm the annealing.
# "converged" means the estimate moved by less than 10% of its level over the second half of the
# training it had, not that more epochs would leave it there. 10% is well above what a settled
# estimator moves over its second half (0.00-0.07 on correlated Gaussians, 2-32 dims, 60-200
# epochs) and well below the climb of an estimator stopped early (+0.2 to +1.4 at 20-30 epochs of
# the same runs). It is also the precision MIMIC can use: a block's weight is its share of the
# summed MI, so an estimate still 10% short moves that block's weight by at most 10% of its MI part.
# SLOPE_TOL: the line fitted to the last window may move by at most 10% of the level across it
# (under a constant rate the end of the curve must be flat too). SPREAD_TOL: the residual std
# around that line may be at most 25% of the level; over 10 epochs that puts the standard error
# of the average near 8%, small beside the shares MIMIC turns it into.
CONVERGENCE_WINDOW = 10
CHANGE_TOL = 0.1
SLOPE_TOL = 0.1
SPREAD_TOL = 0.25
MI_FLOOR = 0.05

# What to change, per non-converged reason (see `convergence`).
ADVICE = {
    "too few epochs": "raise --mi_epochs",
    "zero": "raise --mi_epochs or --mi_lr, or check the teacher",
    "rising": "raise --mi_epochs",
    "falling": "lower --mi_lr",
    "noisy": "lower --mi_lr or raise --mi_epochs",
}


@dataclass(frozen=True)
class MISettings:
    """How a statistics network is trained and evaluated: every estimator option and its default.

    epochs, lr, weight_decay, hidden, average_last: passes over the training samples, Adam's rate
    and weight decay, the hidden width, and how many last epochs' bounds MI averages.
    standardize: "feature" feeds each input with every feature centred and scaled to unit std over
    the N samples, "global" centres each feature and divides by one scale per input, "none" feeds
    the raw inputs as the authors do. MI is invariant under these invertible maps, so this only
    conditions the optimisation (raw activations of very different scales stall Adam at lr 1e-3).
    evaluation: after each epoch, "global" averages one bound over all evaluated samples per each
    of EVAL_PERMUTATIONS fixed permutations; "per_batch" averages clipped per-batch bounds in the
    data's order as the authors do (evaluate_bound_per_batch).
    holdout: a seeded random fraction of the samples the statistics network never trains on; the
    bound is evaluated on them, so that memorising the training pairs (which drives the bound on
    them towards log N however weak the dependence) does not count as information. 0 trains and
    evaluates on every sample, as the authors do.
    schedule: "cosine" anneals the rate from lr to 0 over the epochs, so that the last epochs
    measure one settled network rather than Adam's epoch-to-epoch jitter; "constant" keeps lr, as
    the authors do.
    order: "shuffled" reshuffles the training samples every epoch and drops the incomplete last
    batch; "ordered" takes them in the data's order every epoch, the last partial batch kept, as
    the authors do (training_batches).
    first_layer: "split" builds the first layer as Linear(da, h) + Linear(dz, h, no bias), each
    with PyTorch's default init over its own fan-in (so the z-weights start up to 1/sqrt(dz)
    rather than 1/sqrt(da + dz)); "joint" is one Linear(da + dz, h), as the authors.
    seed: seeds the network's init, the holdout split, the batches and the permutations (MIMIC
    passes --seed).
    """
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 512
    average_last: int = 10
    standardize: str = "feature"
    evaluation: str = "global"
    holdout: float = 0.2
    schedule: str = "cosine"
    order: str = "shuffled"
    first_layer: str = "split"
    seed: int = 0

    def __post_init__(self):
        for name, choices in (("standardize", STANDARDIZATIONS), ("evaluation", EVALUATIONS),
                              ("schedule", SCHEDULES), ("order", ORDERS), ("first_layer", FIRST_LAYERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")


# The authors' estimator (their MIMIC.py; docs/fidelity.md): raw inputs, every sample trained on and evaluated,
# per-batch evaluation, a constant rate, batches in the data's order, one joint first layer.
AUTHORS = MISettings(standardize="none", evaluation="per_batch", holdout=0.0, schedule="constant",
                     order="ordered", first_layer="joint")


class StatisticsNetwork(nn.Module):
    """T(a, z) = Linear(da+dz, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, 1).

    first_layer "split": the first layer is two modules, fc_a = Linear(da, h) and
    fc_z = Linear(dz, h, bias=False), each initialised over its own fan-in. "joint": one module
    fc = Linear(da + dz, h), initialised as PyTorch initialises that Linear. Either way the layer
    is applied as (a-part + bias) + z-part, which equals the Linear on the concatenation [a; z]
    and lets the joint and the shuffled (marginal) pairs share the product with the large a-block.
    """

    def __init__(self, dim_a, dim_z, hidden=512, first_layer="split"):
        super().__init__()
        if first_layer == "split":
            self.fc_a = nn.Linear(dim_a, hidden)
            self.fc_z = nn.Linear(dim_z, hidden, bias=False)
        elif first_layer == "joint":
            self.fc = nn.Linear(dim_a + dim_z, hidden)
        else:
            raise ValueError(f"first_layer must be one of {FIRST_LAYERS}, not {first_layer!r}")
        self.dim_a, self.first_layer = dim_a, first_layer
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def first_a(self, a):
        """a: BxDa -> BxH, the first layer's a-columns applied to a, plus its bias."""
        if self.first_layer == "split":
            return self.fc_a(a)
        return F.linear(a, self.fc.weight[:, :self.dim_a], self.fc.bias)

    def first_z(self, z):
        """z: BxDz -> BxH, the first layer's z-columns applied to z."""
        if self.first_layer == "split":
            return self.fc_z(z)
        return F.linear(z, self.fc.weight[:, self.dim_a:])

    def forward(self, a, z, perm):
        """a: BxDa, z: BxDz, perm: B indices -> (T(a_i, z_i), T(a_i, z_perm(i))), each B."""
        ha, hz = self.first_a(a), self.first_z(z)
        joint = self.rest(ha + hz).squeeze(-1)
        marginal = self.rest(ha + hz[perm]).squeeze(-1)
        return joint, marginal


def dv_bound(t_joint, t_marginal):
    """Donsker-Varadhan bound: mean T(joint) - log mean exp T(marginal)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, dim=0) - math.log(t_marginal.numel()))


def clip_bound(value):
    """A bound value as the authors count it: negative or NaN -> 0 (MI is never negative)."""
    return value if math.isfinite(value) and value > 0 else 0.0


@torch.no_grad()
def standardization_stats(x, mode):
    """x: NxD -> (mean: D, scale: D), so that (x - mean) / scale is the standardised input.

    "feature": scale = each feature's std over the N samples (population std); features that
    are constant (see CONSTANT_FEATURE_TOL) get scale 1 and are only centred.
    "global": every feature is centred by its own mean, then all share one scale, the RMS of the
    centred matrix, i.e. sqrt(mean over features of the per-feature variances).
    """
    var, mean = torch.var_mean(x, dim=0, unbiased=False)
    if mode == "feature":
        std = var.sqrt()
        scale = torch.where(std > CONSTANT_FEATURE_TOL * std.max(), std, torch.ones_like(std))
    elif mode == "global":
        rms = var.mean().sqrt()
        scale = (rms if rms > 0 else torch.ones_like(rms)).expand_as(mean)
    else:
        raise ValueError(f"standardize must be 'feature' or 'global' here, not {mode!r}")
    return mean, scale


@torch.no_grad()
def apply_standardization(x, mean, scale):
    """x: NxD, mean, scale: D -> (x - mean) / scale, a new NxD tensor (one copy of x at most)."""
    return (x - mean).div_(scale)


@torch.no_grad()
def evaluate_bound(net, a, z, perms, chunk=1024):
    """The DV bound over all of (a, z), averaged over the marginal pairs of each permutation in perms."""
    ha = torch.cat([net.first_a(a[s:s + chunk]) for s in range(0, len(a), chunk)])
    hz = torch.cat([net.first_z(z[s:s + chunk]) for s in range(0, len(z), chunk)])
    joint = torch.cat([net.rest(ha[s:s + chunk] + hz[s:s + chunk]).squeeze(-1) for s in range(0, len(a), chunk)])
    values = []
    for perm in perms:
        marginal = torch.cat([net.rest(ha[s:s + chunk] + hz[perm[s:s + chunk]]).squeeze(-1)
                              for s in range(0, len(a), chunk)])
        values.append(dv_bound(joint, marginal).item())
    return sum(values) / len(values)


def holdout_split(n, fraction, seed):
    """(train, held-out) index tensors: a seeded random `fraction` of range(n) held out (both in
    increasing order); fraction 0 trains and evaluates on every sample."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be in [0, 1), not {fraction}")
    every = torch.arange(n)
    held = int(round(fraction * n))
    if held == 0:
        return every, every
    if n - held < 2 or held < 2:
        raise ValueError(f"holdout {fraction} of {n} samples leaves fewer than 2 to train or to evaluate on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def training_batches(train, batch_size, order, generator):
    """One estimator epoch's batches: a list of index tensors into the samples.

    train: the training indices in the data's order. "shuffled": a fresh permutation of them
    (drawn from `generator`), cut into full batches, the incomplete last one dropped; "ordered":
    `train` itself cut into batches, the last partial batch kept, as the authors do.
    """
    n = len(train)
    if order == "ordered":
        return [train[s:s + batch_size] for s in range(0, n, batch_size)]
    shuffled = train[torch.randperm(n, generator=generator).to(train.device)]
    return [shuffled[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]


@torch.no_grad()
def evaluate_bound_per_batch(net, a, z, batch_size, generator):
    """The authors' evaluation: a: NxDa, z: NxDz -> mean over batches of the clipped DV bound.

    Batches of `batch_size` samples in the data's order (0..N-1), the last partial batch kept
    and counted as one batch; the marginal pairs are a random permutation within each batch;
    each batch's bound is clipped at 0 (negative or NaN -> 0) before the simple mean. `net` is
    called as net(a_batch, z_batch, perm) -> (joint: B, marginal: B).
    """
    values = []
    for s in range(0, len(a), batch_size):
        a_b, z_b = a[s:s + batch_size], z[s:s + batch_size]
        perm = torch.randperm(len(a_b), generator=generator).to(a.device)
        values.append(clip_bound(dv_bound(*net(a_b, z_b, perm)).item()))
    return sum(values) / len(values)


def _mean(values):
    return sum(values) / len(values)


def convergence(history, window=CONVERGENCE_WINDOW, change_tol=CHANGE_TOL, slope_tol=SLOPE_TOL,
                spread_tol=SPREAD_TOL, floor=MI_FLOOR):
    """Has the per-epoch MI history settled? -> dict(converged, reason, change, slope, spread,
    window, halfway).

    With N = len(history), h = N // 2 and level = max(mean of the last `window` values, floor):
      change = (mean of the last window - mean of the window ending at epoch h, i.e. epochs
               h-window+1..h) / level, signed: how far the estimate moved over the second half
               of training, from a time the rate was still high (the schedule flattens
               this measure least; see CHANGE_TOL for what none of them sees);
      slope  = the least-squares line's change across the last window / level, signed;
      spread = std of the residuals around that line / level (the noise once the trend is out,
               so a steady rise is not counted twice).
    Verdicts, first match wins: N < 2 * window (the two windows would overlap) -> "too few
    epochs" (change, slope, spread None); every value in the last window 0 -> "zero" (the
    estimator found no dependence; MI 0 is not a measurement); |change| > change_tol, else
    |slope| > slope_tol -> "rising" or "falling" by the sign of that measure; spread > spread_tol
    -> "noisy"; else "converged".
    """
    if window < 3:
        raise ValueError(f"window must be at least 3 epochs to fit a line and its noise, not {window}")
    halfway = len(history) // 2
    report = {"converged": False, "reason": "too few epochs", "change": None, "slope": None, "spread": None,
              "window": window, "halfway": halfway}
    if len(history) < 2 * window:
        return report
    ys = [float(v) for v in history[-window:]]
    mean = _mean(ys)
    centre = (window - 1) / 2
    xs = [i - centre for i in range(window)]
    per_epoch = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    residual = math.sqrt(sum((y - mean - per_epoch * x) ** 2 for x, y in zip(xs, ys)) / window)
    level = max(mean, floor)
    change = (mean - _mean([float(v) for v in history[halfway - window:halfway]])) / level
    slope, spread = per_epoch * (window - 1) / level, residual / level
    if all(y == 0 for y in ys):
        reason = "zero"
    elif abs(change) > change_tol:
        reason = "rising" if change > 0 else "falling"
    elif abs(slope) > slope_tol:
        reason = "rising" if slope > 0 else "falling"
    elif spread > spread_tol:
        reason = "noisy"
    else:
        reason = "converged"
    report.update(converged=reason == "converged", reason=reason, change=change, slope=slope, spread=spread)
    return report


def mi_warnings(blocks, mi, reports):
    """One line per block whose estimate has not converged, plus one if every MI is 0.

    blocks: names, mi: values in nats, reports: `convergence` dicts, all in the same order.
    """
    lines = []
    for block, value, report in zip(blocks, mi, reports):
        if report["converged"]:
            continue
        reason, window = report["reason"], report["window"]
        if reason == "too few epochs":
            detail = (f"too few epochs: fewer than {2 * window}, the last {window} are compared with "
                      f"the {window} up to the half-way epoch")
        elif reason == "zero":
            detail = f"zero: the bound was 0 in each of the last {window} epochs"
        else:
            halfway = report["halfway"]
            detail = (f"{reason}: the mean of the last {window} epochs differs from that of epochs "
                      f"{halfway - window + 1}-{halfway} by {report['change']:+.2f} of the level; over the last "
                      f"{window} epochs change {report['slope']:+.2f}, spread {report['spread']:.2f}")
        lines.append(f"MI of {block} ({value:.4g} nats) has not converged ({detail}); {ADVICE[reason]}")
    if mi and all(v == 0 for v in mi):
        lines.append("every block's MI is 0: the attention weights fall back to uniform shares "
                     "(MIMIC then equals --attention uniform); raise --mi_epochs or --mi_lr, "
                     "or check the teacher")
    return lines


def estimate_mi(a, z, settings=MISettings(), batch_size=128, desc="MI", return_report=False):
    """Estimate I(a; z) in nats from paired samples a: NxDa, z: NxDz (on any device).

    settings: the estimator's options (MISettings); batch_size: samples per training step (and
    per evaluated batch with evaluation "per_batch"). The inputs are standardised once, before
    training; a statistics network is trained for settings.epochs passes over the training
    samples (batches by settings.order); after each epoch the bound is evaluated on the evaluation
    samples, negative or NaN values counting as 0.
    Returns (mi, history), mi being the mean of the last settings.average_last epochs, or with
    return_report (mi, history, convergence(history)).
    """
    s = settings
    if s.standardize != "none":
        a = apply_standardization(a, *standardization_stats(a, s.standardize))
        z = apply_standardization(z, *standardization_stats(z, s.standardize))
    train, held = (idx.to(a.device) for idx in holdout_split(len(a), s.holdout, s.seed))
    a_eval, z_eval = a[held], z[held]
    generator = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = StatisticsNetwork(a.shape[1], z.shape[1], s.hidden, s.first_layer).to(a.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.epochs) if s.schedule == "cosine" else None
    eval_perms = [torch.randperm(len(held), generator=generator).to(a.device)
                  for _ in range(EVAL_PERMUTATIONS if s.evaluation == "global" else 0)]
    batch_size = min(batch_size, len(train))
    history = []
    for _ in progress(range(s.epochs), desc=desc):
        for idx in training_batches(train, batch_size, s.order, generator):
            perm = torch.randperm(len(idx), generator=generator).to(a.device)
            joint, marginal = net(a[idx], z[idx], perm)
            loss = -dv_bound(joint, marginal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if annealing is not None:
            annealing.step()
        if s.evaluation == "per_batch":
            value = evaluate_bound_per_batch(net, a_eval, z_eval, batch_size, generator)
        else:
            value = evaluate_bound(net, a_eval, z_eval, eval_perms)
        history.append(clip_bound(value))
    tail = history[-s.average_last:] if history else [0.0]
    mi = sum(tail) / len(tail)
    return (mi, history, convergence(history)) if return_report else (mi, history)


def mi_to_weights(mi, base, scale=10000.0):
    """Attention-transfer weight per block: base_l + scale * MI_l / sum(MI); equal shares if all 0."""
    total = sum(mi)
    shares = [m / total for m in mi] if total > 0 else [1.0 / len(mi)] * len(mi)
    return [b + scale * s for b, s in zip(base, shares)]
