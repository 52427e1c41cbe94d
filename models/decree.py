"""DECREE (Feng et al., CVPR 2023): is a pre-trained encoder backdoored? Search for the smallest
patch trigger that makes the encoder map every image to (nearly) the same embedding.

A trigger is a 2-D mask m (HxW, values in [0, 1]) and a pattern p (HxWx3, in [0, 255]); a
triggered image is (1 - m) * x + m * p on 0-255 pixels. Both are optimised through tanh, from
unconstrained float64 parameters, so they stay in range:

    m = tanh(w) / (2 - EPS) + 0.5          p = (tanh(v) / (2 - EPS) + 0.5) * 255     (both clipped)

    loss = -cos(E(x_t)) + lambda * L1(m)

cos: the mean cosine similarity between the embeddings of the different triggered images of a
batch (off-diagonal pairs); L1: the mask's L1 norm over the mask repeated on the 3 channels (3x
the 2-D sum), as the authors write it. lambda adapts every step (next_lambda). The best trigger is
the one of the smallest L1 among the steps whose |cos| exceeded the success threshold; a backdoored
encoder has a small one (its trigger), a clean encoder needs a mask over much of the image.

Everything here is a function of explicit tensors; detect.py reads the files, keeps the state
across epochs (checkpoint.pth) and decides the verdict.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.logs import check_finite, progress

EPS = 1e-7                  # the authors' epsilon() in the tanh scaling
NO_TRIGGER_L1 = 1 / EPS     # the L1 reported when no step succeeded: 1e7


@dataclass(frozen=True)
class Settings:
    """The constants of the search, the authors' for 32x32 encoders (CIFAR-10, STL-10). Their
    code uses lambda_min 1e-7 and stop_patience 35 for 224x224 (ImageNet, CLIP) encoders."""
    cos_threshold: float = 0.99         # a step succeeds when |cos| exceeds it
    lambda_init: float = 1e-3
    lambda_factor: float = 5.0          # lambda is multiplied or divided by it
    lambda_patience: int = 5            # ... after more than this many successes / failures in a row
    lambda_min: float = 1e-5            # no cut below it; below it, a run of successes resets lambda
    lambda_max: float = 1e5             # no raise from it or above
    lambda_reset_patience: int = 10     # successes in a row below lambda_min before the reset
    stop_patience: int = 10             # steps without a smaller L1 before an early stop


# ---------------------------------------------------------------- the trigger and its loss

class Trigger(nn.Module):
    """The search's parameters: w (HxW) and v (HxWx3), float64, unconstrained. forward() gives the
    mask (HxW, in [0, 1]) and the pattern (HxWx3, in [0, 255])."""

    def __init__(self, height, width, generator=None):
        super().__init__()
        # Mask and pattern start uniform in [0, 1) (the pattern then scaled to 0-255), drawn in
        # this order, as the authors; the parameters are their tanh pre-images.
        mask = torch.rand(height, width, dtype=torch.float64, generator=generator)
        pattern = torch.rand(height, width, 3, dtype=torch.float64, generator=generator)
        self.mask_param = nn.Parameter(to_param(mask))
        self.pattern_param = nn.Parameter(to_param(pattern))

    def forward(self):
        return mask_from(self.mask_param), pattern_from(self.pattern_param)


def to_param(unit):
    """The tanh pre-image of values in [0, 1): inverse of the scaling in mask_from."""
    return torch.atanh((unit - 0.5) * (2 - EPS))


def mask_from(w):
    """HxW parameters -> mask in [0, 1]. tanh / (2 - EPS) + 0.5 reaches 1 + 2.5e-8 at the ends,
    hence the clip."""
    return (torch.tanh(w) / (2 - EPS) + 0.5).clamp(0, 1)


def pattern_from(v):
    """HxWx3 parameters -> pattern in [0, 255]."""
    return ((torch.tanh(v) / (2 - EPS) + 0.5) * 255).clamp(0, 255)


def stamp(images, mask, pattern):
    """BxHxWx3 images (0-255, float64) -> (1 - m) * x + m * p, clipped to 0-255, not rounded."""
    m = mask.unsqueeze(-1)                                   # HxWx1, the same on every channel
    return ((1 - m) * images + m * pattern).clamp(0, 255)


def mask_l1(mask):
    """L1 norm of the mask repeated on the 3 channels: 3x the sum of the 2-D mask (the authors'
    regulariser and their reported score)."""
    return 3 * mask.abs().sum()


def self_cosine(z):
    """Mean cosine similarity of the B(B-1) ordered pairs of different rows of z (BxD), B >= 2."""
    z = F.normalize(z, dim=-1)
    sim = z @ z.t()                                          # BxB
    b = len(z)
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def pl1(l1, height, width):
    """DECREE's normalised score: the raw L1 (over 3 channels) divided by 3 x H x W, i.e. the mean
    of the 2-D mask, the share of the image the trigger covers (a full 0/1 square of s x s pixels
    scores s^2 / (H W))."""
    return l1 / (3 * height * width)


def lr_at(epoch, lr, drop_epochs=(30, 50), drops=(0.1, 0.05)):
    """The learning rate of epoch `epoch` (1-based): lr up to drop_epochs[0], then drops[0] up to
    drop_epochs[1], then drops[1] (the authors' step schedule: absolute rates, not factors)."""
    if epoch <= drop_epochs[0]:
        return lr
    return drops[0] if epoch <= drop_epochs[1] else drops[1]


# ---------------------------------------------------------------- lambda, the best trigger, the stop

@dataclass
class LambdaState:
    """The weight of the L1 term and the counters that move it."""
    value: float
    up: int = 0         # successes in a row since the last raise
    down: int = 0       # failures in a row since the last cut
    held: int = 0       # successes in a row while value < lambda_min


def next_lambda(state, success, s):
    """The lambda state after one step that succeeded (|cos| > threshold) or not, as the authors'
    code moves it: more than lambda_patience successes in a row multiply lambda by lambda_factor
    (unless it is at lambda_max already), more than lambda_patience failures in a row divide it
    (unless it is below lambda_min); more than lambda_reset_patience successes in a row while
    lambda is below lambda_min set it back to lambda_init. s: Settings."""
    value, up, down, held = state.value, state.up, state.down, state.held
    if value < s.lambda_min and success:
        held += 1
        if held > s.lambda_reset_patience:
            value, up, down = s.lambda_init, 0, 0
    else:
        held = 0
    up, down = (up + 1, 0) if success else (0, down + 1)
    if up > s.lambda_patience:
        if value < s.lambda_max:
            value *= s.lambda_factor
        up = 0
    elif down > s.lambda_patience:
        if value >= s.lambda_min:
            value /= s.lambda_factor
        down = 0
    return LambdaState(value, up, down, held)


@dataclass
class SearchState:
    """Everything the search carries from step to step besides the trigger and its optimiser:
    lambda, the best trigger so far and the early-stop counter (steps since the best L1 last fell,
    counted once a trigger exists), and whether the search has stopped."""
    lam: LambdaState
    best_l1: float = NO_TRIGGER_L1
    best_mask: torch.Tensor = None          # HxW, float64
    best_pattern: torch.Tensor = None       # HxWx3, float64, 0-255
    best_epoch: int = None
    stale: int = 0
    stopped: bool = False

    @classmethod
    def start(cls, s):
        return cls(lam=LambdaState(s.lambda_init))

    @property
    def found(self):
        return self.best_mask is not None

    def to_dict(self):
        """Plain values and tensors, for a weights-only checkpoint."""
        return {"lam": vars(self.lam).copy(), "best_l1": self.best_l1, "best_mask": self.best_mask,
                "best_pattern": self.best_pattern, "best_epoch": self.best_epoch, "stale": self.stale,
                "stopped": self.stopped}

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "lam": LambdaState(**d["lam"])})


def record_step(state, cos, l1, mask, pattern, epoch, s):
    """Update the state after one step whose trigger (mask, pattern) gave cos and l1 (floats)."""
    success = abs(cos) > s.cos_threshold
    improved = success and l1 < state.best_l1
    if improved:
        state.best_l1, state.best_epoch = l1, epoch
        state.best_mask, state.best_pattern = mask.detach().clone(), pattern.detach().clone()
    if state.found:
        state.stale = 0 if improved else state.stale + 1
    state.lam = next_lambda(state.lam, success, s)


def should_stop(epoch_cos, state, s):
    """The authors' early stop, checked after each epoch: the epoch's mean |cos| above the threshold
    and more than stop_patience steps since the best L1 last fell."""
    return abs(epoch_cos) > s.cos_threshold and state.stale > s.stop_patience


# ---------------------------------------------------------------- one step, one epoch

def search_step(embed, images, trigger, optimizer, lam):
    """One Adam step on the trigger. embed: Bx3xHxW float64 images in [0, 1] -> BxD embeddings
    (the frozen encoder, its input normalisation included); images: BxHxWx3 float64, 0-255.
    Returns (cos, l1, loss) as floats and the (mask, pattern) that gave them."""
    mask, pattern = trigger()
    triggered = stamp(images, mask, pattern).permute(0, 3, 1, 2) / 255          # Bx3xHxW
    cos = self_cosine(embed(triggered))
    l1 = mask_l1(mask)
    loss = -cos + lam * l1
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return cos.item(), l1.item(), loss.item(), mask, pattern


def search_epoch(embed, images, batches, trigger, optimizer, state, epoch, s, desc=None):
    """One epoch of the search over `batches` (index tensors into images, NxHxWx3 float64 0-255);
    updates `state` (a batch of one image has no pairs and is skipped). Returns the epoch's row:
    mean cos, L1 and loss, lambda at its end, the best L1 and the early-stop counter; sets
    state.stopped when the early stop is reached."""
    sums, steps = [0.0, 0.0, 0.0], 0
    bar = progress(batches, desc=desc or f"epoch {epoch}")
    for step, idx in enumerate(bar):
        if len(idx) < 2:
            continue
        cos, l1, loss, mask, pattern = search_step(embed, images[idx], trigger, optimizer, state.lam.value)
        check_finite(loss, epoch, step, what="DECREE loss")
        record_step(state, cos, l1, mask, pattern, epoch, s)
        sums = [a + b for a, b in zip(sums, (cos, l1, loss))]
        steps += 1
        bar.set_postfix(cos=f"{cos:.3f}", l1=f"{l1:.1f}")
    cos, l1, loss = (v / max(steps, 1) for v in sums)
    state.stopped = steps > 0 and should_stop(cos, state, s)
    return {"cos": cos, "l1": l1, "loss": loss, "lambda": state.lam.value,
            "best_l1": state.best_l1 if state.found else None, "stale": state.stale}


def verdict(score, threshold):
    """'backdoored' when the PL1 score is below the threshold, else 'clean'."""
    return "backdoored" if score < threshold else "clean"
