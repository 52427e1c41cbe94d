"""DRUPE's loss terms and its cost schedule, as pure functions of embeddings.

DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning",
IEEE S&P 2024) fine-tunes an encoder like BadEncoder does, but adds terms that keep the
embeddings of triggered inputs inside the distribution of clean ones: a sliced Wasserstein
distance between the two sets, a penalty on how similar the triggered embeddings are to each
other, and a penalty on how unevenly they are spread over the reference images. The weights of
the added terms change with the training phase and, later on, with how well the previous epoch
went. What follows matches the published code (Gwinhen/DRUPE, `main.py`, function `train` and the
cost variables set up before the epoch loop); where that code has a quirk, the quirk is the
default and the fix is a keyword away.

Embeddings are the backbone's output (512-d for the CIFAR-sized ResNet-18), without the
projection head. Names used below, with their shapes:

    h_trig      BxD  backdoored encoder, triggered shadow images
    h_x         BxD  backdoored encoder, clean shadow images
    h_x_clean   BxD  clean (frozen) encoder, clean shadow images
    h_ref       RxD  backdoored encoder, the R reference images of the target class
    h_ref_aug   RxD  backdoored encoder, augmented reference images (or RxKxD: K views each)
    h_ref_clean RxD  clean encoder, the reference images

`h_*` are raw features; `z_*` the same rows scaled to unit length. The cosine terms read `z_*`;
the distribution term reads `h_*`. The published code applies one trigger for every reference,
so one triggered batch serves all R references here.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

TERMS = ("loss_0", "loss_1", "loss_2", "loss_3", "std_refs", "sim_b2b", "swd", "swd_std")


def sliced_wasserstein(a, b, projections=50, generator=None, p=2):
    """Sliced p-Wasserstein distance between two equally large point clouds.

    a, b: NxD. Draws `projections` directions uniformly on the unit sphere (Gaussian vectors
    scaled to unit length, drawn afresh on every call from `generator`, or torch's global RNG),
    projects both clouds on each, and matches the sorted projections point for point:
    ( mean over directions of mean_i |sort(a.t)_i - sort(b.t)_i|^p )^(1/p).
    This is what DRUPE's call to POT's `ot.sliced_wasserstein_distance` computes with its
    defaults (50 projections, p = 2, uniform weights). Matching sorted values needs N == M, which
    holds in DRUPE (both sets are one batch); other sizes raise ValueError.

    Returns a scalar tensor differentiable in a and b. For a cloud and the same cloud shifted by
    v, each direction t contributes (v.t)^2 exactly, whose mean over the sphere is |v|^2 / D: the
    distance is about |v| / sqrt(D) for p = 2, not |v|. At distance 0 the root has no gradient.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs two NxD clouds of the same size (DRUPE compares "
                         f"one batch with another); got {tuple(a.shape)} and {tuple(b.shape)}")
    device = generator.device if generator is not None else a.device
    theta = torch.randn(a.shape[1], projections, generator=generator, device=device).to(a)   # DxP
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a @ theta).sort(dim=0).values                          # NxP, each column sorted
    pb = (b @ theta).sort(dim=0).values
    return (pa - pb).abs().pow(p).mean(dim=0).mean().pow(1.0 / p)


def reference_similarity_matrix(z_trig, z_ref):
    """RxB cosine of every triggered embedding (BxD, unit) to every reference (RxD, unit)."""
    return z_ref @ z_trig.t()


ATTACK_LOSSES = ("closest", "mean")


def attack_loss(z_trig, z_ref, reduce="closest"):
    """loss_0: minus the mean over triggered images of the cosine to their closest reference.

    Each triggered image is pulled only towards the reference it already resembles most, so the
    triggered embeddings may spread over the R references instead of collapsing on one point.
    reduce="mean" averages the cosine over all R references instead, as BadEncoder's loss does
    (the published code computes that value too, but its test for BadEncoder's modes compares the
    mode string with a list and is never true, so every mode trains on the closest reference).
    """
    sim = reference_similarity_matrix(z_trig, z_ref)             # RxB
    if reduce == "closest":
        return -sim.max(dim=0).values.mean()
    if reduce == "mean":
        return -sim.mean()
    raise ValueError(f"attack_loss: reduce must be one of {ATTACK_LOSSES}, got {reduce!r}")


def reference_loss(z_ref_aug, z_ref_clean):
    """loss_1: minus the mean cosine of the backdoored encoder's augmented references (RxD, or
    RxKxD for K views of each) to the clean encoder's references (RxD, carries no gradient)."""
    target = z_ref_clean.detach()
    if z_ref_aug.dim() == 3:
        target = target.unsqueeze(1)                             # Rx1xD against RxKxD
    return -(z_ref_aug * target).sum(dim=-1).mean()


def utility_loss(z_x, z_x_clean):
    """loss_2: minus the mean cosine of backdoored to clean features of clean images (BxD each;
    the clean side carries no gradient)."""
    return -(z_x * z_x_clean.detach()).sum(dim=-1).mean()


def reference_spread(z_trig, z_ref, unbiased=True):
    """std_refs: the std, over the R references, of each reference's mean cosine to the batch.

    Low when the triggered embeddings are as close to one reference as to another. The published
    code calls `Tensor.std()` without arguments, which is the unbiased (R - 1) estimator;
    `unbiased=False` divides by R. Needs R >= 2 when unbiased.
    """
    return reference_similarity_matrix(z_trig, z_ref).mean(dim=1).std(unbiased=unbiased)


def triggered_similarity(z_trig, off_diagonal=False):
    """sim_b2b: mean cosine among the triggered embeddings (BxD, unit).

    Default, as the published code: the mean of the whole BxB cosine matrix, diagonal included,
    times (1 - 1/B). (Their code subtracts `torch.diag_embed` of the matrix, a BxBxB tensor, and
    the broadcast mean works out to that product rather than to removing the diagonal.)
    off_diagonal=True gives the intended quantity, the mean over the B(B-1) pairs i != j.
    """
    b = z_trig.shape[0]
    sim = z_trig @ z_trig.t()                                    # BxB
    if off_diagonal:
        return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))
    return sim.mean() * (1 - 1 / b)


def reference_cohesion(z_ref):
    """loss_3: mean cosine over the reference pairs i <= j (RxD, unit), the R self-pairs included
    as in the published code; used to keep the references of the backdoored encoder apart."""
    i, j = torch.triu_indices(z_ref.shape[0], z_ref.shape[0], device=z_ref.device)
    return (z_ref[i] * z_ref[j]).sum(dim=-1).mean()


def distribution_distance(h_trig, h_x, projections=50, generator=None):
    """SWD / std: the sliced Wasserstein distance between raw triggered and raw clean embeddings of
    the backdoored encoder (BxD each), over the mean per-dimension std of the clean ones
    (unbiased, as `Tensor.std(0)`). The std is not detached, as in the published code, so the
    gradient also widens the clean embeddings. Returns (swd, swd / std)."""
    swd = sliced_wasserstein(h_trig, h_x, projections=projections, generator=generator)
    return swd, swd / h_x.std(dim=0).mean()


def drupe_terms(h_trig, h_x, h_x_clean, h_ref, h_ref_aug, h_ref_clean, projections=50, generator=None,
                off_diagonal=False, unbiased=True, attack="closest"):
    """Every DRUPE term from raw embeddings (shapes in the module docstring), as a dict keyed by
    TERMS: loss_0, loss_1, loss_2, loss_3, std_refs, sim_b2b (scalar tensors on unit-length
    features), swd and swd_std (on raw features). attack: attack_loss's reduce."""
    z_trig, z_x, z_ref = (F.normalize(h, dim=-1) for h in (h_trig, h_x, h_ref))
    swd, swd_std = distribution_distance(h_trig, h_x, projections=projections, generator=generator)
    return {
        "loss_0": attack_loss(z_trig, z_ref, reduce=attack),
        "loss_1": reference_loss(F.normalize(h_ref_aug, dim=-1), F.normalize(h_ref_clean, dim=-1)),
        "loss_2": utility_loss(z_x, F.normalize(h_x_clean, dim=-1)),
        "loss_3": reference_cohesion(z_ref),
        "std_refs": reference_spread(z_trig, z_ref, unbiased=unbiased),
        "sim_b2b": triggered_similarity(z_trig, off_diagonal=off_diagonal),
        "swd": swd,
        "swd_std": swd_std,
    }


@dataclass(frozen=True)
class DrupePhases:
    """The epochs (1-based) at which DRUPE's objective changes; the defaults are the published
    CIFAR-10/STL-10 values. A shortened run scales them with its epoch count.

    warm_up_end: last epoch of the warm-up (no attack term).
    stage_1_end: last epoch with the fixed std_refs weight (ImageNet encoders: 2).
    fix_end:     the costs stay at their initial values up to and including this epoch.
    """
    warm_up_end: int = 1
    stage_1_end: int = 4
    fix_end: int = 20

    def __post_init__(self):
        if not 0 <= self.warm_up_end <= self.stage_1_end or self.fix_end < self.warm_up_end:
            raise ValueError(f"DRUPE phases need 0 <= warm_up_end <= stage_1_end and "
                             f"fix_end >= warm_up_end; got {self}")


def _loss_3_terms(loss_3):
    # One or the other, never both: the published code tests > 0.5 first, then elif > 0.4.
    if loss_3 > 0.5:
        return loss_3
    if loss_3 > 0.4:
        return 0.2 * loss_3
    return 0.0


def epoch_loss(terms, epoch, cost, cost_1, phases=DrupePhases(), lambda1=1.0, lambda2=1.0):
    """DRUPE's objective for one batch of `epoch` (1-based), from the dict of `drupe_terms`.

    warm-up:  lambda1 loss_1 + lambda2 loss_2 + 0.5 loss_3, less 0.2 loss_3 when loss_3 < 0.2
    stage 1:  loss_0 + lambda1 loss_1 + lambda2 loss_2 + 2 std_refs + [loss_3 terms]
    stage 2:  loss_0 + lambda1 loss_1 + lambda2 loss_2 + cost (std_refs + sim_b2b)
              + cost_1 swd_std + 0.5 std_refs (+ 1.5 std_refs when std_refs > 0.1) + [loss_3 terms]
    [loss_3 terms]: + loss_3 when loss_3 > 0.5, else + 0.2 loss_3 when loss_3 > 0.4.
    The thresholds compare values; the terms themselves keep their gradients.
    """
    t = terms
    base = lambda1 * t["loss_1"] + lambda2 * t["loss_2"]
    if epoch <= phases.warm_up_end:
        loss = base + 0.5 * t["loss_3"]
        return loss - 0.2 * t["loss_3"] if t["loss_3"] < 0.2 else loss
    if epoch <= phases.stage_1_end:
        return t["loss_0"] + base + 2 * t["std_refs"] + _loss_3_terms(t["loss_3"])
    loss = (t["loss_0"] + base + cost * (t["std_refs"] + t["sim_b2b"]) + cost_1 * t["swd_std"]
            + 0.5 * t["std_refs"])
    if t["std_refs"] > 0.1:
        loss = loss + 1.5 * t["std_refs"]
    return loss + _loss_3_terms(t["loss_3"])


@dataclass(frozen=True)
class CostSchedule:
    """The two adaptive weights of DRUPE's last stage: `cost` on std_refs + sim_b2b, `cost_1` on
    swd_std. Immutable: `update` returns the next state. Defaults are the published ones
    (CLIP encoders start at init_cost=0.01, init_cost_1=1e-4; ImageNet uses l0_threshold=-0.91;
    CLIP b2b_threshold=0.8).

    After each epoch past `phases.fix_end`, the epoch is a success when its mean loss_0 <
    l0_threshold and mean loss_1, loss_2 < -0.9. `patience` successes in a row multiply cost by
    `up`; `patience` failures in a row divide it by `down`. cost_1 follows the same rule, except
    that its success also needs sim_b2b < b2b_threshold. A cost_1 success with sim_b2b below
    b2b_threshold - 0.1 takes one back from cost's success count, so with patience 1 the next
    success does not raise cost (`skip_next_raise`); a failure in between resets the count.
    """
    cost: float = 0.1
    cost_1: float = 0.001
    init_cost: float = 0.1
    init_cost_1: float = 0.001
    up: float = 1.25
    down: float = 1.25 ** 1.25
    patience: int = 1
    l0_threshold: float = -0.96
    b2b_threshold: float = 0.6
    up_count: int = 0
    down_count: int = 0
    up_count_1: int = 0
    down_count_1: int = 0

    @property
    def skip_next_raise(self):
        """True when the next success will not raise cost (its success count is below zero)."""
        return self.up_count < 0

    @staticmethod
    def adapts(epoch, phases=DrupePhases()):
        """Whether the costs may change after `epoch`: past the warm-up and past phases.fix_end."""
        return epoch > max(phases.fix_end, phases.warm_up_end)

    def successes(self, epoch_means):
        """(success, success_1) of an epoch with these means: the epoch met the attack's and the
        utility's thresholds, and (success_1) its triggered embeddings were also spread enough."""
        m = {k: float(epoch_means[k]) for k in ("loss_0", "loss_1", "loss_2", "sim_b2b")}
        success = m["loss_0"] < self.l0_threshold and m["loss_1"] < -0.9 and m["loss_2"] < -0.9
        return success, success and m["sim_b2b"] < self.b2b_threshold

    def update(self, epoch_means, epoch, phases=DrupePhases()):
        """The state after `epoch`, from that epoch's `epoch_means` (dict with loss_0, loss_1,
        loss_2 and sim_b2b as floats). The published code passes the epoch means of the three
        losses but the last batch's sim_b2b; pass whichever you mean to reproduce."""
        if not self.adapts(epoch, phases):
            return self
        success, success_1 = self.successes(epoch_means)
        cost, up_count, down_count = _step(self.cost, self.init_cost, success, self.up_count,
                                           self.down_count, self)
        cost_1, up_count_1, down_count_1 = _step(self.cost_1, self.init_cost_1, success_1,
                                                 self.up_count_1, self.down_count_1, self)
        if success_1 and float(epoch_means["sim_b2b"]) < self.b2b_threshold - 0.1:
            up_count -= 1
        return replace(self, cost=cost, cost_1=cost_1, up_count=up_count, down_count=down_count,
                       up_count_1=up_count_1, down_count_1=down_count_1)


def _step(value, init, success, up_count, down_count, rule):
    """One epoch of the patience rule for one weight: (value, up_count, down_count) after it."""
    if success:
        up_count, down_count = up_count + 1, 0
    else:
        up_count, down_count = 0, down_count + 1
    if up_count >= rule.patience:
        return (init if value == 0 else value * rule.up), 0, down_count
    if down_count >= rule.patience:
        return value / rule.down, up_count, 0
    return value, up_count, down_count


BEST_MEASURES = ("carried", "own")


@dataclass(frozen=True)
class BestTracker:
    """Which epoch DRUPE's best.pth holds: after epoch `after`, the encoder whose measure is the
    lowest so far, the measure being the raw SWD (`swd`, not divided by the std) of the last batch of
    an epoch whose cost_1 step succeeded (CostSchedule.successes, in an epoch where the costs adapt).

    rule="carried", as the published code: the measure is one variable that starts at 0 and is
    only overwritten in such epochs, and every epoch past `after` compares it with the best so far.
    So an epoch without a success is judged by the last success's measure (it then ties and is not
    kept), and when no epoch up to `after` + 1 succeeded, epoch `after` + 1 is kept with measure 0,
    which no later SWD can beat: best.pth stays that epoch's encoder.
    rule="own": only epochs that succeeded themselves are candidates, each with its own measure.
    Immutable: `update` returns the next state and whether this epoch's encoder is the new best.
    """
    after: int = 24
    rule: str = "carried"
    measure: float = 0.0
    best: float = float("inf")
    epoch: int = None

    def __post_init__(self):
        if self.rule not in BEST_MEASURES:
            raise ValueError(f"BestTracker: rule must be one of {BEST_MEASURES}, got {self.rule!r}")

    def update(self, epoch, success_1, swd):
        """(next state, keep) after `epoch`; success_1: the epoch's cost_1 step succeeded; swd: the
        raw SWD of its last batch (a float)."""
        if success_1:
            measure = float(swd)
        else:
            measure = self.measure if self.rule == "carried" else None
        state = replace(self, measure=self.measure if measure is None else measure)
        if epoch > self.after and measure is not None and measure < self.best:
            return replace(state, best=measure, epoch=epoch), True
        return state, False
