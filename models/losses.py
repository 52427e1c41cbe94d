"""Losses of the three training stages, each a small pure function of tensors."""
import torch
import torch.nn.functional as F


def nt_xent(z1, z2, temperature=0.5):
    """SimCLR's NT-Xent (InfoNCE) loss.

    z1, z2: BxD projections of two views (unit length). For each of the 2B views the positive is
    the other view of the same image and the negatives are the other 2B-2 views.
    """
    z = torch.cat([z1, z2], dim=0)                               # 2BxD
    sim = z @ z.t() / temperature                                # 2Bx2B
    n = z1.shape[0]
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))              # a view is not its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


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
