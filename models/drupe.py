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


def attack_loss(z_trig, z_ref):
    """loss_0: minus the mean over triggered images of the cosine to their closest reference.

    Each triggered image is pulled only towards the reference it already resembles most, so the
    triggered embeddings may spread over the R references instead of collapsing on one point.
    """
    return -reference_similarity_matrix(z_trig, z_ref).max(dim=0).values.mean()


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
                off_diagonal=False, unbiased=True):
    """Every DRUPE term from raw embeddings (shapes in the module docstring), as a dict keyed by
    TERMS: loss_0, loss_1, loss_2, loss_3, std_refs, sim_b2b (scalar tensors on unit-length
    features), swd and swd_std (on raw features)."""
    z_trig, z_x, z_ref = (F.normalize(h, dim=-1) for h in (h_trig, h_x, h_ref))
    swd, swd_std = distribution_distance(h_trig, h_x, projections=projections, generator=generator)
    return {
        "loss_0": attack_loss(z_trig, z_ref),
        "loss_1": reference_loss(F.normalize(h_ref_aug, dim=-1), F.normalize(h_ref_clean, dim=-1)),
        "loss_2": utility_loss(z_x, F.normalize(h_x_clean, dim=-1)),
        "loss_3": reference_cohesion(z_ref),
        "std_refs": reference_spread(z_trig, z_ref, unbiased=unbiased),
        "sim_b2b": triggered_similarity(z_trig, off_diagonal=off_diagonal),
        "swd": swd,
        "swd_std": swd_std,
    }
