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


def check_finite_encoder(model, image_size, device, stage_name):
    """Refuse to keep an encoder whose weights, buffers or features (on a fixed probe batch of 4
    images, eval mode, no grad) hold NaN or inf. The train/eval modes are restored afterwards.

    image_size: int or (H, W). Pass the unwrapped model: a DDP forward would run collectives.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    if any(t.is_floating_point() and not torch.isfinite(t).all() for _, t in tensors):
        raise UserError(f"the {stage_name} encoder has non-finite weights (NaN/inf) after training; it "
                        f"was not saved as a result. Lower --lr and run again")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    dtype = next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32)
    probe = torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = _tensors(model(probe.to(device=device, dtype=dtype)))
    finally:
        for module, training in modes.items():
            module.training = training
    if not all(torch.isfinite(t).all() for t in out if t.is_floating_point()):
        raise UserError(f"the {stage_name} encoder has non-finite features (NaN/inf) after training; it "
                        f"was not saved as a result. Lower --lr and run again")


def check_finite_features(feats, what, path):
    """Stage 3: features of the encoder under test must be finite before they are scored."""
    finite = torch.isfinite(feats).all() if isinstance(feats, torch.Tensor) else np.isfinite(feats).all()
    if not finite:
        raise UserError(f"the encoder {path} gives non-finite features on {what}; it cannot be scored "
                        f"(a broken encoder is not a removed backdoor)")
