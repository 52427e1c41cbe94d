"""Each loss against a hand computation; the contrastive loss falls under optimisation."""
import math

import torch
import torch.nn.functional as F

from models import attention_transfer, badencoder_loss, clone_loss, nt_xent
from models.losses import attention_map


def test_nt_xent_matches_hand_computation():
    z1 = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    z2 = F.normalize(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), dim=1)
    t = 0.5
    views = [z1[0], z1[1], z2[0], z2[1]]
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i, v in enumerate(views):
        logits = {j: float(v @ w) / t for j, w in enumerate(views) if j != i}
        total += -logits[positive[i]] + math.log(sum(math.exp(s) for s in logits.values()))
    assert math.isclose(nt_xent(z1, z2, t).item(), total / 4, rel_tol=1e-5)


def test_nt_xent_falls_when_trained():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        z1 = F.normalize(net(x + 0.1 * torch.randn_like(x)), dim=1)
        z2 = F.normalize(net(x + 0.1 * torch.randn_like(x)), dim=1)
        loss = nt_xent(z1, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_attention_transfer_zero_for_identical_maps_and_hand_case():
    a = torch.randn(2, 4, 3, 3)
    assert attention_transfer(a, a.clone()).item() == 0.0
    # One channel, two pixels: student map (1, 0), teacher map (3^2, 4^2) / 25 = (0.36, 0.64).
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[3.0, 4.0]]]])
    assert torch.allclose(attention_map(t), torch.tensor([[9 / (81 + 256) ** 0.5, 16 / (81 + 256) ** 0.5]]),
                          atol=1e-6)
    m_t = torch.tensor([9.0, 16.0]) / math.sqrt(81 + 256)
    expected = ((1 - m_t[0]) ** 2 + (0 - m_t[1]) ** 2) / 2
    assert math.isclose(attention_transfer(s, t).item(), expected.item(), rel_tol=1e-5)


def test_attention_transfer_ignores_scale_and_passes_no_gradient_to_teacher():
    a = torch.randn(3, 5, 4, 4)
    t = a.clone().requires_grad_(True)
    assert attention_transfer(a, 7 * t).item() < 1e-10
    attention_transfer(torch.randn(3, 5, 4, 4, requires_grad=True), t).backward()
    assert t.grad is None


def test_clone_loss_is_minus_mean_cosine():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    expected = -(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).mean()
    assert torch.allclose(clone_loss(a, b), expected, atol=1e-6)
    assert math.isclose(clone_loss(a, 3 * a).item(), -1.0, rel_tol=1e-6)


def test_badencoder_loss_terms():
    e = torch.eye(3)
    f_trig = e[[0, 0]]                          # both triggered images point at reference 0
    f_ref = e[[0, 1]]                           # two references
    loss, l0, l1, l2 = badencoder_loss(f_trig, f_ref, f_ref_aug=e[[0, 1]], f_ref_clean=e[[0, 2]],
                                       f_x=e[[1, 2]], f_x_clean=e[[1, 2]], lambda1=2.0, lambda2=3.0)
    assert l0.item() == -0.5                    # mean over the 2x2 pairs of (1, 0; 1, 0)
    assert l1.item() == -0.5 and l2.item() == -1.0
    assert loss.item() == -0.5 + 2 * -0.5 + 3 * -1.0
