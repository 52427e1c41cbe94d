"""Device choice from --device, and the optional CUDA fast paths (bf16 autocast, channels-last)."""
import torch

from .errors import UserError


def resolve_device(name):
    """Turn --device into a torch.device; 'auto' picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: the stages run on cpu or cuda only; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu")
    return device


def fast_paths(args, device):
    """(amp, channels_last) from --amp/--channels_last: 'auto' turns each on for CUDA only."""
    def on(value):
        return device.type == "cuda" if value == "auto" else value == "on"
    return on(args.amp), on(args.channels_last)


def autocast(device, enabled):
    """bfloat16 autocast on the device (no gradient scaling needed, unlike float16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def place(model, device, channels_last=False):
    """Move a model to the device, in channels-last memory format when asked (faster convolutions on
    recent GPUs)."""
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
