"""DRUPE's terms against hand computations, the sliced Wasserstein distance against its closed form
for a shifted cloud, and the phase and cost schedules on made-up values."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.drupe import (TERMS, CostSchedule, DrupePhases, attack_loss, distribution_distance,
                          drupe_terms, epoch_loss, reference_cohesion, reference_loss, reference_spread,
                          sliced_wasserstein, triggered_similarity, utility_loss)


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


# ---- the cosine terms on hand-made unit vectors ----

E = torch.eye(4)


def test_attack_loss_takes_the_closest_reference():
    z_trig = E[[0, 0, 1]]                                      # B = 3
    z_ref = E[[0, 1, 2]]                                       # R = 3
    assert attack_loss(z_trig, z_ref).item() == -1.0           # every image sits on some reference
    z_trig = F.normalize(torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 0, 1.0]]), dim=1)
    # closest cosines: 1/sqrt(2) (to e0 or e1) and 0 (orthogonal to all three)
    assert math.isclose(attack_loss(z_trig, z_ref).item(), -0.5 / math.sqrt(2), rel_tol=1e-6)


def test_reference_and_utility_losses():
    assert reference_loss(E[[0, 1]], E[[0, 2]]).item() == -0.5
    # K = 2 views of each of R = 2 references: cosines (1, 0) and (1, 1)
    views = torch.stack([E[[0, 1]], E[[1, 1]]])                # RxKxD
    assert reference_loss(views, E[[0, 1]]).item() == -0.75
    assert utility_loss(E[[1, 2, 3]], E[[1, 2, 0]]).item() == pytest.approx(-2 / 3)


def test_clean_side_carries_no_gradient():
    z = F.normalize(torch.randn(4, 3, generator=gen(8)), dim=1).requires_grad_(True)
    clean = z.detach().clone().requires_grad_(True)
    (reference_loss(z, clean) + utility_loss(z, clean)).backward()
    assert clean.grad is None and z.grad is not None


def test_reference_spread_is_the_unbiased_std_over_references():
    # Triggered images e0, e0, e1 against references e0, e1, e2: per-reference batch means 2/3, 1/3, 0.
    z_trig, z_ref = E[[0, 0, 1]], E[[0, 1, 2]]
    means = torch.tensor([2 / 3, 1 / 3, 0.0])
    sample_var = ((means - means.mean()) ** 2).sum() / 2       # = 1/9
    assert math.isclose(reference_spread(z_trig, z_ref).item(), math.sqrt(sample_var), rel_tol=1e-6)
    assert math.isclose(reference_spread(z_trig, z_ref, unbiased=False).item(),
                        math.sqrt(sample_var * 2 / 3), rel_tol=1e-6)
    assert reference_spread(E[[0, 1, 2]], z_ref).item() == 0.0  # one image on each reference


def test_triggered_similarity_quirk_and_fixed_version():
    # B = 3: e0, e0, e1. Cosine matrix [[1,1,0],[1,1,0],[0,0,1]] sums to 5, its diagonal to 3.
    z = E[[0, 0, 1]]
    assert math.isclose(triggered_similarity(z).item(), 5 / 9 * (1 - 1 / 3), rel_tol=1e-6)   # 10/27
    assert math.isclose(triggered_similarity(z, off_diagonal=True).item(), 2 / 6, rel_tol=1e-6)
    # identical embeddings: the published value is 1 - 1/B, the off-diagonal mean is 1
    same = E[[2] * 4]
    assert math.isclose(triggered_similarity(same).item(), 0.75, rel_tol=1e-6)
    assert triggered_similarity(same, off_diagonal=True).item() == 1.0


def test_triggered_similarity_default_matches_the_published_expression():
    # The published code subtracts torch.diag_embed of the BxB matrix (a BxBxB tensor) and takes the mean.
    z = F.normalize(torch.randn(5, 7, generator=gen(9), dtype=torch.float64), dim=1)
    sim = z @ z.t()
    assert torch.allclose(triggered_similarity(z), (sim - torch.diag_embed(sim)).mean())


def test_reference_cohesion_counts_the_self_pairs():
    # References e0, e0, e1: pairs i <= j are (0,0)=1, (0,1)=1, (0,2)=0, (1,1)=1, (1,2)=0, (2,2)=1.
    assert math.isclose(reference_cohesion(E[[0, 0, 1]]).item(), 4 / 6, rel_tol=1e-6)
    assert math.isclose(reference_cohesion(E[[0, 1, 2]]).item(), 3 / 6, rel_tol=1e-6)   # orthogonal


def test_drupe_terms_normalises_cosine_inputs_but_not_the_distance():
    h_trig = 5 * E[[0, 0, 1]]
    h_ref = 2 * E[[0, 1, 2]]
    terms = drupe_terms(h_trig, h_x=3 * E[[1, 2, 3]], h_x_clean=E[[1, 2, 0]], h_ref=h_ref,
                        h_ref_aug=7 * E[[0, 1, 3]], h_ref_clean=E[[0, 1, 2]], generator=gen())
    assert set(terms) == set(TERMS)
    assert terms["loss_0"].item() == -1.0
    assert terms["loss_1"].item() == pytest.approx(-2 / 3)
    assert terms["loss_2"].item() == pytest.approx(-2 / 3)
    assert terms["loss_3"].item() == pytest.approx(0.5)
    assert terms["std_refs"].item() == pytest.approx(1 / 3)
    assert terms["sim_b2b"].item() == pytest.approx(10 / 27)
    swd = sliced_wasserstein(h_trig, 3 * E[[1, 2, 3]], generator=gen())
    assert terms["swd"].item() == pytest.approx(swd.item())
    assert terms["swd_std"].item() == pytest.approx(swd.item() / (3 * E[[1, 2, 3]]).std(0).mean().item())


# ---- the distribution term's gradient ----

def test_swd_over_std_gradient_matches_finite_differences():
    h_trig = torch.randn(6, 4, generator=gen(10), dtype=torch.float64, requires_grad=True)
    h_x = torch.randn(6, 4, generator=gen(11), dtype=torch.float64, requires_grad=True)

    def swd_std(t, x):                                         # fixed directions: a deterministic function
        return distribution_distance(t, x, projections=20, generator=gen(12))[1]

    assert torch.autograd.gradcheck(swd_std, (h_trig, h_x))
    swd_std(h_trig, h_x).backward()
    assert h_trig.grad.abs().sum() > 0 and h_x.grad.abs().sum() > 0   # the std is not detached


def test_descending_swd_over_std_moves_triggered_embeddings_into_the_clean_cloud():
    h_x = torch.randn(32, 8, generator=gen(13))
    h_trig = (torch.randn(32, 8, generator=gen(14)) + 4.0).requires_grad_(True)
    opt = torch.optim.SGD([h_trig], lr=20.0)                  # each point's gradient carries a 1/N
    g = gen(15)
    start = distribution_distance(h_trig, h_x, projections=200, generator=gen(16))[1].item()
    for _ in range(60):
        opt.zero_grad()
        distribution_distance(h_trig, h_x, generator=g)[1].backward()
        opt.step()
    end = distribution_distance(h_trig, h_x, projections=200, generator=gen(16))[1].item()
    assert end < 0.1 * start


# ---- the phase schedule ----

def fixed_terms(loss_3=0.3, std_refs=0.05):
    return {"loss_0": torch.tensor(-0.9), "loss_1": torch.tensor(-0.8), "loss_2": torch.tensor(-0.7),
            "loss_3": torch.tensor(loss_3), "std_refs": torch.tensor(std_refs),
            "sim_b2b": torch.tensor(0.4), "swd": torch.tensor(3.0), "swd_std": torch.tensor(2.0)}


@pytest.mark.parametrize("loss_3, expected", [(0.3, -1.5 + 0.15), (0.1, -1.5 + 0.05 - 0.02)])
def test_warm_up_has_no_attack_term(loss_3, expected):
    assert epoch_loss(fixed_terms(loss_3), 1, 0.1, 0.001).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_3, extra", [(0.3, 0.0), (0.45, 0.2 * 0.45), (0.6, 0.6)])
def test_stage_1_weights_std_refs_by_two(loss_3, extra):
    # loss_3 = 0.6 adds loss_3 only: the 0.4 rule is the other branch, not added on top
    for epoch in (2, 4):
        assert epoch_loss(fixed_terms(loss_3), epoch, 0.1, 0.001).item() == pytest.approx(
            -0.9 - 0.8 - 0.7 + 2 * 0.05 + extra)


@pytest.mark.parametrize("std_refs, loss_3", [(0.05, 0.3), (0.2, 0.6)])
def test_stage_2_adds_the_costs(std_refs, loss_3):
    cost, cost_1 = 0.5, 0.01
    expected = (-2.4 + cost * (std_refs + 0.4) + cost_1 * 2.0 + 0.5 * std_refs
                + (1.5 * std_refs if std_refs > 0.1 else 0) + (loss_3 if loss_3 > 0.5 else 0))
    assert epoch_loss(fixed_terms(loss_3, std_refs), 5, cost, cost_1).item() == pytest.approx(expected)


def test_phase_thresholds_are_parameters():
    phases = DrupePhases(warm_up_end=2, stage_1_end=3, fix_end=5)
    t = fixed_terms()
    assert epoch_loss(t, 2, 0.1, 0.001, phases).item() == pytest.approx(-1.5 + 0.15)
    assert epoch_loss(t, 3, 0.1, 0.001, phases).item() == pytest.approx(-2.4 + 0.1)
    assert epoch_loss(t, 4, 0.1, 0.001, phases).item() == pytest.approx(-2.4 + 0.1 * 0.45 + 0.002 + 0.025)
    with pytest.raises(ValueError):
        DrupePhases(warm_up_end=3, stage_1_end=2)


def test_epoch_loss_keeps_gradients():
    t = {k: v.clone().requires_grad_(True) for k, v in fixed_terms(std_refs=0.2).items()}
    epoch_loss(t, 5, 0.5, 0.01).backward()
    assert t["swd_std"].grad.item() == pytest.approx(0.01)
    assert t["std_refs"].grad.item() == pytest.approx(0.5 + 0.5 + 1.5)
    assert t["swd"].grad is None                                # only the normalised distance is used


# ---- the cost schedule ----

UP, DOWN = 1.25, 1.25 ** 1.25
GOOD = {"loss_0": -0.97, "loss_1": -0.95, "loss_2": -0.95}


def means(sim_b2b, good=True):
    return {**(GOOD if good else {**GOOD, "loss_0": -0.5}), "sim_b2b": sim_b2b}


def test_costs_do_not_change_up_to_the_fix_epoch():
    s = CostSchedule()
    for epoch in range(1, 21):
        s = s.update(means(0.3), epoch)
    assert (s.cost, s.cost_1, s.up_count) == (0.1, 0.001, 0)
    assert CostSchedule().update(means(0.3), 6, DrupePhases(fix_end=5)).cost == pytest.approx(0.1 * UP)


def test_success_and_failure_move_both_costs():
    s = CostSchedule().update(means(0.55), 21)                 # success, sim_b2b < 0.6: both up
    assert (s.cost, s.cost_1) == pytest.approx((0.1 * UP, 0.001 * UP))
    s = s.update(means(0.55, good=False), 22)                  # failure: both down
    assert (s.cost, s.cost_1) == pytest.approx((0.1 * UP / DOWN, 0.001 * UP / DOWN))
    s = s.update(means(0.7), 23)                               # success, sim_b2b >= 0.6: cost_1 down
    assert (s.cost, s.cost_1) == pytest.approx((0.1 * UP * UP / DOWN, 0.001 * UP / DOWN ** 2))
    # each threshold is strict, and loss_1 and loss_2 count too
    for bad in ({"loss_0": -0.96}, {"loss_1": -0.9}, {"loss_2": -0.85}):
        assert CostSchedule().update({**means(0.3), **bad}, 21).cost == pytest.approx(0.1 / DOWN)


def test_low_sim_b2b_skips_the_next_raise_of_cost():
    s = CostSchedule().update(means(0.4), 21)                  # raises both, then arms the skip
    assert (s.cost, s.cost_1, s.skip_next_raise) == pytest.approx((0.1 * UP, 0.001 * UP, True))
    s = s.update(means(0.55), 22)                              # success: cost skipped, cost_1 up
    assert (s.cost, s.cost_1, s.skip_next_raise) == pytest.approx((0.1 * UP, 0.001 * UP ** 2, False))
    s = s.update(means(0.55), 23)                              # the next success raises again
    assert s.cost == pytest.approx(0.1 * UP ** 2)
    # a failure in between disarms the skip (and lowers cost)
    s = CostSchedule().update(means(0.4), 21).update(means(0.4, good=False), 22).update(means(0.55), 23)
    assert s.cost == pytest.approx(0.1 * UP / DOWN * UP)


def test_cost_schedule_is_pure():
    s = CostSchedule()
    s.update(means(0.4), 21)
    assert (s.cost, s.cost_1, s.up_count) == (0.1, 0.001, 0)
