"""The training step and epoch of every stage that trains an encoder with NT-Xent and, optionally,
attention transfer and feature cloning from a frozen teacher: MIMIC, and the defences of
defenses.py (fine-tuning is the case with every teacher weight 0, and then the teacher is not run)."""
import math

import torch

from utils.device import autocast
from utils.distributed import mean_over_ranks
from utils.logs import check_finite, progress

from .losses import attention_transfer, clone_loss, nt_xent

TERMS = ("loss", "nce", "at", "clone")
LR_SCHEDULES = ("constant", "cosine")


def epoch_lr(lr, epoch, epochs, schedule):
    """The learning rate of epoch `epoch` (1-based) of `epochs`: lr throughout (constant), or lr
    annealed along a half cosine, lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, from lr at epoch 1
    to nearly 0 at the last (cosine; torch's CosineAnnealingLR stepped once per epoch). A function
    of the epoch alone, so a resumed run picks up the same rate without saved scheduler state."""
    if schedule == "constant":
        return lr
    return lr * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def distill_step(student, teacher, view1, view2, optimizer, weights, clone_weight, temperature, amp=False,
                 after_step=None):
    """One step: one student pass per view, one no-grad teacher pass on view1.

    loss = NT-Xent(view1, view2) + sum_l weights[l] * AT(student block l, teacher block l)
           + clone_weight * clone(student feature, teacher feature), on view1.
    Returns the loss terms {loss, nce, at, clone} as CPU scalars, averaged over the processes
    under torchrun (the student then DDP-wrapped). With every weight at 0 the teacher is not run
    (it may be None). after_step() runs after each optimiser step (e.g. to keep pruned weights at
    zero). With amp the passes run under bfloat16 autocast; the losses are computed in float32.
    """
    use_teacher = any(w != 0 for w in weights) or clone_weight != 0
    with autocast(view1.device, amp):
        f1, z1, blocks_s = student(view1, return_blocks=True)    # BxD, BxP, 4 block outputs
        _, z2 = student(view2)
        if use_teacher:
            with torch.no_grad():
                f_t, blocks_t = teacher.f(view1, return_blocks=True)
    nce = nt_xent(z1.float(), z2.float(), temperature)
    at = clone = torch.zeros((), device=nce.device)
    if use_teacher:
        at = sum(w * attention_transfer(s.float(), t.float()) for w, s, t in zip(weights, blocks_s, blocks_t))
        clone = clone_loss(f1.float(), f_t.float())
    loss = nce + at + clone_weight * clone
    terms = mean_over_ranks(torch.stack([loss, nce, at, clone])).cpu()
    if torch.isfinite(terms[0]):        # the same decision in every process
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return dict(zip(TERMS, terms))


def distill_epoch(student, teacher, loader, optimizer, weights, clone_weight, temperature, epoch, out_dir,
                  amp=False, after_step=None):
    """One epoch of distill_step over the loader's (view1, view2) batches; returns the mean terms.
    Stops with a one-line error on a non-finite loss (the last checkpoint in out_dir stays)."""
    student.train()
    sums, steps = dict.fromkeys(TERMS, 0.0), 0
    bar = progress(loader, desc=f"epoch {epoch}")
    for step, (view1, view2) in enumerate(bar):
        terms = distill_step(student, teacher, view1, view2, optimizer, weights, clone_weight, temperature,
                             amp, after_step)
        check_finite(terms["loss"].item(), epoch, step, out_dir)
        for k, v in terms.items():
            sums[k] += v.item()
        steps += 1
        bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}
