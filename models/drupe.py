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
