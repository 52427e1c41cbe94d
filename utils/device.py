"""Device choice from --device, the optional CUDA fast paths (bf16 autocast, channels-last), and
cuDNN's determinism."""
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


def set_cudnn(deterministic):
    """cuDNN's algorithm choice: the autotuner off (torch's default, and the authors'), and the
    deterministic algorithms only when asked (the authors' code asks)."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic


def autocast(device, enabled):
    """bfloat16 autocast on the device (no gradient scaling needed, unlike float16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# Channels-last CPU convolutions crashed torch 2.14 ("double free or corruption") in BadEncoder's
# backward with a width-4 ResNet (4-channel convolutions); widths 8 and 16 ran. Narrower models stay
# contiguous on CPU.
MIN_CHANNELS_LAST_CPU = 8
_notes_printed = set()   # a stage that places a teacher and a student prints each note once


def place(model, device, channels_last=False):
    """Move a model to the device, in channels-last memory format when asked (faster convolutions on
    recent GPUs, and on this project's CPU); on CPU, a model with a convolution narrower than
    MIN_CHANNELS_LAST_CPU channels stays contiguous, with a note."""
    if channels_last and torch.device(device).type == "cpu":
        narrowest = min((m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), default=None)
        if narrowest is not None and narrowest < MIN_CHANNELS_LAST_CPU:
            note = (f"note: --channels_last off for this model: a {narrowest}-channel convolution, and torch's "
                    f"channels-last CPU kernels crashed below {MIN_CHANNELS_LAST_CPU} channels")
            if note not in _notes_printed:
                _notes_printed.add(note)
                print(note)
            channels_last = False
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
