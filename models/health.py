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
# The probe is the first PROBE_IMAGES images of the data the stage trains on (the caller passes
# them, under the test transform), not noise: on Gaussian noise a healthy encoder's features vary
# less the larger the image, because global average pooling averages independent pixels (fresh
# width-16 encoders: 0.006-0.023 at 32 px, 9e-5 to 4e-4 at 224 px, some below this threshold),
# while an image's content does not average out. Measured with benchmarks/spreads.py on the first
# 32 demo images scaled to 32, 96 and 224 px (ResNet-18, widths 16 and 64, both inits;
# docs/measurements.md, "Collapse threshold"): fresh encoders 0.0054 to 0.074 at every size, the
# trained demo encoder 0.41, 0.27 and 0.066; MIMIC's student one epoch into --lr 1e-2 from the
# demo encoder 1.4e-3. Collapsed: BadEncoder with --lr 10 on the tests' random data ends at 9.3e-8
# (float32 rounding noise), an all-zero encoder at 0. MIN_SPREAD = 1e-4 lies 54x below the lowest
# fresh encoder, 14x below that student and 1000x above the collapsed encoder.
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


def check_finite_encoder(model, probe, stage_name, source=None):
    """Refuse to keep an encoder whose weights, buffers or features (on the probe batch, eval mode,
    no grad) hold NaN or inf, or whose features on the probe batch are collapsed (see
    collapse_reason). The train/eval modes are restored afterwards; no random number is drawn.

    probe: Nx3xHxW, the stage's own images under the test transform, on the model's device: the
    first PROBE_IMAGES images of the data the stage trains on (see MIN_SPREAD for why not noise).
    source: the input file the model was loaded from, to check an input encoder before training
    (its fault is the file's, not --lr's); None checks a model after training.
    Pass the unwrapped model: a DDP forward would run collectives.
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
    dtype = next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(probe.to(dtype=dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    if not all(torch.isfinite(t).all() for t in _tensors(out) if t.is_floating_point()):
        refuse("non-finite features (NaN/inf)")
    if source is None:
        reason = collapse_reason(out[0].float().cpu())
        if reason is not None:
            refuse(f"collapsed to (near-)constant features ({reason} on the first {len(probe)} training images)")


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
