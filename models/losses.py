"""Losses of the three training stages, each a small pure function of tensors."""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def nt_xent(z1, z2, temperature=0.5, gather=True):
    """SimCLR's NT-Xent (InfoNCE) loss.

    z1, z2: BxD projections of two views (unit length). For each of the 2B views the positive is
    the other view of the same image and the negatives are the other 2B-2 views.

    Under torch.distributed (and with gather), the projections of all N processes are gathered
    with their gradients, each process scores its own 2B views against all 2NB, and the loss is
    the mean over its own rows; the mean over processes is then the loss of one process with
    batch NB, and DDP's gradient average is that loss's gradient.
    """
    local = torch.cat([z1, z2], dim=0)                           # 2BxD, the rows scored here
    n, rank, world = z1.shape[0], 0, 1
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        columns = gather_with_grad(local)                        # 2NBxD: rank 0's z1, z2, rank 1's ...
    else:
        columns = local
    sim = local @ columns.t() / temperature                      # 2Bx2NB
    rows = torch.arange(2 * n, device=local.device)
    own = rows + 2 * n * rank                                    # each row's own column
    positive = (rows + n) % (2 * n) + 2 * n * rank               # the other view of the same image
    sim = sim.masked_fill(F.one_hot(own, 2 * n * world).bool(), float("-inf"))  # not its own negative
    return F.cross_entropy(sim, positive)


def gather_with_grad(x):
    """Every process's x, concatenated along dim 0 in rank order; the backward pass sums the
    gradients of all processes into each process's own part."""
    return torch.cat(dist_nn.all_gather(x), dim=0)


def attention_map(a):
    """Attention map of Zagoruyko & Komodakis (p=2): BxCxHxW -> BxHW, each row of unit L2 norm."""
    m = a.pow(2).sum(dim=1).flatten(1)                          # BxHW
    return m / (m.norm(dim=1, keepdim=True) + 1e-6)


def attention_transfer(a_student, a_teacher):
    """Mean squared difference of the two attention maps (the teacher side carries no gradient)."""
    return (attention_map(a_student) - attention_map(a_teacher.detach())).pow(2).mean()


def clone_loss(f_student, f_teacher):
    """Minus the mean cosine similarity of student and teacher features (BxD each)."""
    return -F.cosine_similarity(f_student, f_teacher.detach(), dim=-1).mean()


def badencoder_loss(f_trig, f_ref, f_ref_aug, f_ref_clean, f_x, f_x_clean, lambda1=1.0, lambda2=1.0):
    """BadEncoder's objective on L2-normalised backbone features.

    f_trig    BxD  backdoored encoder on triggered shadow images
    f_ref     RxD  backdoored encoder on the reference inputs
    f_ref_aug RxD  backdoored encoder on augmented reference inputs
    f_ref_clean RxD clean encoder on the reference inputs
    f_x, f_x_clean BxD backdoored / clean encoder on clean shadow images
    Returns (loss, loss0, loss1, loss2); each term is averaged over the reference inputs.
    """
    loss0 = -(f_trig @ f_ref.t()).mean()                          # triggered -> reference
    loss1 = -(f_ref_aug * f_ref_clean).sum(dim=-1).mean()         # reference stays put
    loss2 = -(f_x * f_x_clean).sum(dim=-1).mean()                 # clean features preserved
    return loss0 + lambda1 * loss1 + lambda2 * loss2, loss0, loss1, loss2
