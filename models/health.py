"""Is a trained encoder, or what it computes, fit to be kept or scored? Checks that stop a run
with one line (UserError) rather than save or score a broken model."""
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from utils.errors import UserError


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


# Collapse: a feature matrix F (N images x D, the L2-normalised backbone features) is refused when
#   relative spread  = mean_i ||F_i - mean(F)||^2 / mean_i ||F_i||^2  < MIN_SPREAD   (also when F is 0)
# the share of the features' energy that varies across images: 0 for constant features. The
# effective rank exp(H(p)), p = singular values of F - mean(F) divided by their sum (Roy & Vetterli
# 2007), counts the directions they vary in; it is reported with a refusal but does not decide
# one: tiny noise on constant features is isotropic, so a collapsed encoder can have a high rank,
# and a fine-pruned encoder with one or two layer4 channels left has rank 1.1 yet varies.
# Measured at tiny size (width 4, 32x32 random images, seeds 0-4, both inits; on the data and on
# the probe batch below): fresh encoders have spread 0.0079 to 0.046 (rank 15.7 to 25.6 of 32
# dimensions); fine_pruning's Liu rule on random data (63 of 64 channels pruned) 0.0013 (rank
# 1.1); BadEncoder with --lr 10 ends at spread 9.3e-8 (rank 2.4: float32 rounding noise) and an
# all-zero encoder at 0. MIN_SPREAD = 1e-4 lies 13x below the lowest kept value (79x below a
# fresh encoder) and 1000x above the collapsed one.
MIN_SPREAD = 1e-4
PROBE_IMAGES = 32


def feature_spread(feats):
    """(relative spread, effective rank) of a NxD feature matrix; see the constants above."""
    f = torch.as_tensor(feats).double()
    energy = (f ** 2).sum(1).mean()
    if len(f) < 2 or energy == 0:
        return 0.0, 0.0
    centred = f - f.mean(0)
    spread = ((centred ** 2).sum(1).mean() / energy).item()
    s = torch.linalg.svdvals(centred)
    if s.sum() == 0:
        return spread, 0.0
    p = s / s.sum()
    p = p[p > 0]
    return spread, torch.exp(-(p * p.log()).sum()).item()


def collapse_reason(feats):
    """None for features that vary across images, else a short description of their collapse."""
    spread, rank = feature_spread(feats)
    if spread < MIN_SPREAD:
        return f"relative spread {spread:.2g}, effective rank {rank:.2g}"
    return None


def check_finite_encoder(model, image_size, device, stage_name, source=None):
    """Refuse to keep an encoder whose weights, buffers or features (on a fixed probe batch of
    random images, eval mode, no grad) hold NaN or inf, or whose features on the probe batch are
    collapsed (see collapse_reason). The train/eval modes are restored afterwards.

    source: the input file the model was loaded from, to check an input encoder before training
    (its fault is the file's, not --lr's); None checks a model after training.
    image_size: int or (H, W). Pass the unwrapped model: a DDP forward would run collectives.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module

    def refuse(what):
        if source is not None:
            raise UserError(f"the encoder {source} has {what}; {stage_name} cannot start from it (replace the "
                            f"file, or re-run the stage that wrote it)")
        raise UserError(f"the {stage_name} encoder has {what} after training; it was not saved as a result. "
                        f"Lower --lr and run again")

    tensors = list(model.named_parameters()) + list(model.named_buffers())
    if any(t.is_floating_point() and not torch.isfinite(t).all() for _, t in tensors):
        refuse("non-finite weights (NaN/inf)")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    dtype = next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32)
    probe = torch.randn(PROBE_IMAGES, 3, height, width, generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(probe.to(device=device, dtype=dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    if not all(torch.isfinite(t).all() for t in _tensors(out) if t.is_floating_point()):
        refuse("non-finite features (NaN/inf)")
    if source is None:
        reason = collapse_reason(out[0].float().cpu())
        if reason is not None:
            refuse(f"collapsed to (near-)constant features ({reason} on {PROBE_IMAGES} probe images)")


def check_finite_features(feats, what, path):
    """Stage 3: features of the encoder under test must be finite before they are scored."""
    finite = torch.isfinite(feats).all() if isinstance(feats, torch.Tensor) else np.isfinite(feats).all()
    if not finite:
        raise UserError(f"the encoder {path} gives non-finite features on {what}; it cannot be scored "
                        f"(a broken encoder is not a removed backdoor)")


def check_not_collapsed(feats, path):
    """Stage 3: the encoder under test must give features that vary across the training images."""
    reason = collapse_reason(feats)
    if reason is not None:
        raise UserError(f"the encoder {path} gives (near-)constant features on the train images ({reason}); "
                        f"it cannot be scored (a collapsed encoder is not a removed backdoor)")
