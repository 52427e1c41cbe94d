"""Mutual information by the Donsker-Varadhan lower bound (MINE), and MI-guided layer weights.

MIMIC trains one statistics network per encoder block on activations computed once: the
encoder is frozen, so the estimator never runs it again. Besides the estimate, this module
judges whether the estimator's per-epoch history has settled (`convergence`) and turns those
verdicts into one-line warnings for the log (`mi_warnings`).
"""
import math

import torch
import torch.nn as nn

from utils.logs import progress

STANDARDIZATIONS = ("feature", "global", "none")
EVALUATIONS = ("global", "per_batch")
SCHEDULES = ("cosine", "constant")

# The "global" evaluation averages the DV bound over this many permutations of the evaluated
# samples, drawn once: fixed marginal pairs keep a fresh permutation's noise out of the
# epoch-to-epoch history, and averaging several keeps one permutation's luck out of the level.
EVAL_PERMUTATIONS = 8

# A feature whose std over the samples is below this fraction of the largest feature std is
# treated as constant and only centred: dividing by a (near-)zero std would blow rounding noise
# up to unit variance. Relative, so that the rule does not depend on the inputs' units.
CONSTANT_FEATURE_TOL = 1e-6

# Convergence verdict on the last CONVERGENCE_WINDOW epochs (the same count MI is averaged over
# by default). Both measures are relative to the window's mean MI, floored at MI_FLOOR nats so
# that an estimate hovering near 0 is judged by absolute noise rather than by a ratio that
# explodes. SLOPE_TOL: the fitted line may move by at most 10% of the level across the window,
# i.e. the average is not still drifting by more than its own precision. SPREAD_TOL: the
# residual std around that line may be at most 25% of the level; over 10 epochs that puts the
# standard error of the average near 8%, small beside the shares MIMIC turns it into.
CONVERGENCE_WINDOW = 10
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
    ha = torch.cat([net.fc_a(a[s:s + chunk]) for s in range(0, len(a), chunk)])
    hz = torch.cat([net.fc_z(z[s:s + chunk]) for s in range(0, len(z), chunk)])
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


def convergence(history, window=CONVERGENCE_WINDOW, slope_tol=SLOPE_TOL, spread_tol=SPREAD_TOL,
                floor=MI_FLOOR):
    """Has the per-epoch MI history settled? -> dict(converged, slope, spread, reason, window).

    Over the last `window` values (window >= 3) a least-squares line is fitted; with
    level = max(mean of the window, floor):
      slope  = fitted change across the window (slope per epoch * (window - 1)) / level, signed;
      spread = std of the residuals around the line / level (the noise once the trend is out,
               so a steady rise is not counted twice).
    Verdicts, first match wins: fewer than `window` values -> "too few epochs" (slope and spread
    None); every value in the window 0 -> "zero" (the estimator found no dependence; MI 0 is
    not a measurement); |slope| > slope_tol -> "rising" or "falling"; spread > spread_tol ->
    "noisy"; else "converged".
    """
    if window < 3:
        raise ValueError(f"window must be at least 3 epochs to fit a line and its noise, not {window}")
    if len(history) < window:
        return {"converged": False, "slope": None, "spread": None, "reason": "too few epochs",
                "window": window}
    ys = [float(v) for v in history[-window:]]
    mean = sum(ys) / window
    centre = (window - 1) / 2
    xs = [i - centre for i in range(window)]
    per_epoch = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    residual = math.sqrt(sum((y - mean - per_epoch * x) ** 2 for x, y in zip(xs, ys)) / window)
    level = max(mean, floor)
    slope, spread = per_epoch * (window - 1) / level, residual / level
    if all(y == 0 for y in ys):
        reason = "zero"
    elif abs(slope) > slope_tol:
        reason = "rising" if slope > 0 else "falling"
    elif spread > spread_tol:
        reason = "noisy"
    else:
        reason = "converged"
    return {"converged": reason == "converged", "slope": slope, "spread": spread, "reason": reason,
            "window": window}


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
            detail = f"too few epochs: fewer than {window}"
        elif reason == "zero":
            detail = f"zero: the bound was 0 in each of the last {window} epochs"
        else:
            detail = (f"{reason}: change {report['slope']:+.2f} and spread {report['spread']:.2f} "
                      f"of the level over the last {window} epochs")
        lines.append(f"MI of {block} ({value:.4g} nats) has not converged ({detail}); {ADVICE[reason]}")
    if mi and all(v == 0 for v in mi):
        lines.append("every block's MI is 0: the attention weights fall back to uniform shares "
                     "(MIMIC then equals --attention uniform); raise --mi_epochs or --mi_lr, "
                     "or check the teacher")
    return lines


def estimate_mi(a, z, epochs=200, batch_size=128, lr=1e-3, weight_decay=1e-5, hidden=512,
                average_last=10, seed=0, desc="MI", standardize="feature", evaluation="global",
                holdout=0.2, schedule="cosine", return_report=False):
    """Estimate I(a; z) in nats from paired samples a: NxDa, z: NxDz (on any device).

    standardize: "feature" (default) feeds each input with every feature centred and scaled to
    unit std over the N samples, "global" centres each feature and divides by one scale per
    input, "none" feeds the raw inputs as the authors do. MI is invariant under these invertible
    maps, so this only conditions the optimisation (raw activations of very different scales
    stall Adam at lr 1e-3). The statistics are computed once per input, before training.

    holdout: a seeded random fraction of the samples the statistics network never trains on; the
    bound is evaluated on them, so that memorising the training pairs (which drives the bound on
    them towards log N however weak the dependence) does not count as information. 0 trains and
    evaluates on every sample, as the authors do.
    schedule: "cosine" anneals the learning rate from lr to 0 over the epochs, so that the last
    epochs measure one settled network rather than Adam's epoch-to-epoch jitter; "constant" keeps
    lr, as the authors do.

    Trains a statistics network for `epochs` passes over the training samples (shuffled,
    incomplete last batch dropped); after each epoch the bound is evaluated on the evaluation
    samples, negative or NaN values counting as 0: evaluation="global" averages one bound over
    all of them per each of EVAL_PERMUTATIONS fixed permutations, "per_batch" averages clipped
    per-batch bounds in the data's order as the authors do (evaluate_bound_per_batch).
    Returns (mi, history), mi being the mean of the last `average_last` epochs, or with
    return_report (mi, history, convergence(history)).
    """
    if standardize not in STANDARDIZATIONS:
        raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, not {standardize!r}")
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, not {evaluation!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    if standardize != "none":
        a = apply_standardization(a, *standardization_stats(a, standardize))
        z = apply_standardization(z, *standardization_stats(z, standardize))
    train, held = (idx.to(a.device) for idx in holdout_split(len(a), holdout, seed))
    a_eval, z_eval = a[held], z[held]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = StatisticsNetwork(a.shape[1], z.shape[1], hidden).to(a.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if schedule == "cosine" else None
    eval_perms = [torch.randperm(len(held), generator=generator).to(a.device)
                  for _ in range(EVAL_PERMUTATIONS if evaluation == "global" else 0)]
    n = len(train)
    batch_size = min(batch_size, n)
    history = []
    for _ in progress(range(epochs), desc=desc):
        order = train[torch.randperm(n, generator=generator).to(a.device)]
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            perm = torch.randperm(batch_size, generator=generator).to(a.device)
            joint, marginal = net(a[idx], z[idx], perm)
            loss = -dv_bound(joint, marginal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if annealing is not None:
            annealing.step()
        if evaluation == "per_batch":
            value = evaluate_bound_per_batch(net, a_eval, z_eval, batch_size, generator)
        else:
            value = evaluate_bound(net, a_eval, z_eval, eval_perms)
        history.append(clip_bound(value))
    tail = history[-average_last:] if history else [0.0]
    mi = sum(tail) / len(tail)
    return (mi, history, convergence(history)) if return_report else (mi, history)


def mi_to_weights(mi, base, scale=10000.0):
    """Attention-transfer weight per block: base_l + scale * MI_l / sum(MI); equal shares if all 0."""
    total = sum(mi)
    shares = [m / total for m in mi] if total > 0 else [1.0 / len(mi)] * len(mi)
    return [b + scale * s for b, s in zip(base, shares)]
