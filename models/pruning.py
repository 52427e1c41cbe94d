"""Fine-pruning (Liu et al. 2018) on a SimCLR encoder: rank the output channels of the last residual
stage (layer4) by their mean activation on clean images and prune the least active ones.

A channel is pruned in the weights, not by a mask module, so a pruned checkpoint keeps the key set
of any encoder and a plain strict load gives the pruned network. Output channel c of layer4 is

    block_k out[c] = relu(last_bn_k(...)[c] + shortcut_k[c])

where shortcut_0 is the first block's downsample BatchNorm and shortcut_k (k >= 1) is block k-1's
output. Zeroing weight[c] and bias[c] of every block's last BatchNorm (bn2 in a BasicBlock, bn3
in a Bottleneck) and of the downsample BatchNorm makes out[c] = relu(0 + 0) = 0 for every input,
in train and eval mode alike: a BatchNorm with weight 0 and bias 0 outputs 0 whatever its
statistics. The backbone feature is layer4's output averaged over positions, so the pruned
feature is the unpruned one with those entries set to 0.

Training leaves the zeroed entries at 0 by itself (the pre-activation of a pruned channel is 0, and
ReLU's gradient at 0 is 0 in PyTorch, so no gradient reaches them); defenses.py re-applies
prune_channels after every optimiser step all the same, so the pruning does not rest on that
convention or on the optimiser.
"""
import torch

from .encoder import BLOCK_INDEX


def channel_ranking(activations):
    """Channel indices in increasing order of mean activation (ties: lower index first).

    activations: NxC or NxCxHxW, e.g. layer4's output on clean images. Returns a LongTensor of C.
    """
    means = activations.detach().float().transpose(0, 1).flatten(1).mean(dim=1)     # C
    return torch.sort(means, stable=True).indices


def pruned_count(channels, fraction):
    """How many of `channels` channels a pruning fraction removes: round(fraction * channels)."""
    return round(fraction * channels)


def prune_mask(order, fraction):
    """Keep-mask (bool, one entry per channel): False for the pruned_count(C, fraction) first
    channels of `order` (the least active ones, from channel_ranking)."""
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[order[:pruned_count(len(order), fraction)]] = False
    return keep


def last_stage(model):
    """layer4 of a SimCLR encoder."""
    return model.f.f[BLOCK_INDEX[-1]]


def output_norms(stage):
    """The BatchNorms whose weight and bias set a residual stage's output channels: the first
    block's downsample BatchNorm and every block's last BatchNorm."""
    first = stage[0]
    if first.downsample is None:
        raise ValueError("the stage's first block has an identity shortcut: its input channels would "
                         "reach the output, so they cannot be pruned by its BatchNorms")
    return [first.downsample[1]] + [block.bn3 if hasattr(block, "bn3") else block.bn2 for block in stage]


@torch.no_grad()
def prune_channels(model, channels):
    """Set layer4's output channels `channels` of a SimCLR encoder to exactly 0 for every input,
    in place (see the module docstring)."""
    for norm in output_norms(last_stage(model)):
        index = torch.as_tensor(channels, dtype=torch.long, device=norm.weight.device)
        norm.weight[index] = 0
        norm.bias[index] = 0


def prune_until(order, accuracy, max_drop, step=1):
    """Liu et al.'s stopping rule: prune channels in `order`, `step` at a time, for as long as
    accuracy(k) (of the network with the first k channels of order pruned) stays within max_drop
    of accuracy(0). Stops at the first count that drops more, and never prunes every channel.

    Returns (the largest count k reached within the drop, [(k, accuracy), ...] as measured).
    """
    base = accuracy(0)
    curve, best = [(0, base)], 0
    for k in range(step, len(order), step):
        acc = accuracy(k)
        curve.append((k, acc))
        if acc < base - max_drop:
            break
        best = k
    return best, curve
