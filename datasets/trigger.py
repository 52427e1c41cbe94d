"""Triggers: trigger files (t, tm) and the one function that stamps a patch on images, and the two
kinds of trigger a stage can apply, each with `apply(uint8 NxHxWx3) -> uint8 NxHxWx3` and
`describe() -> dict` (what results files record): PatchTrigger (a trigger file, BadEncoder's) and
FrequencyTrigger (CTRL's, datasets/frequency.py).

The two trigger files the paper's commands use are BadEncoder's released ones (trigger/README.md);
check them with:
    python -m datasets.check_triggers
"""
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write

from .frequency import (CTRL_CHANNELS, CTRL_MAGNITUDE, CTRL_POSITIONS, CTRL_WINDOW, fitting_windows, frequency_trigger,
                        smallest_window)


def stamp_trigger(x, t, tm):
    """Return x * tm + t for uint8 images x (..., H, W, 3); t, tm are (H, W, 3)."""
    out = x.astype(np.float32) * tm + t
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_square_trigger(image_size, start, size, value=255.0):
    """A square patch of `value` covering rows and columns start..start+size-1, as (1, H, W, 3)."""
    if start < 0 or start + size > image_size:
        raise ValueError(f"a {size}px patch at {start} does not fit a {image_size}px image")
    t = np.zeros((1, image_size, image_size, 3), dtype=np.float32)
    tm = np.ones_like(t)
    t[:, start:start + size, start:start + size, :] = value
    tm[:, start:start + size, start:start + size, :] = 0
    return t, tm


def save_trigger(path, t, tm, info=""):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, t=t, tm=tm, info=np.array(info))
    atomic_write(path, write)


def check_trigger(t, tm, path):
    """Triggers t (K,H,W,3) in [0, 255] and masks tm of exactly 0 and 1, K >= 1, all finite."""
    t, tm = np.asarray(t), np.asarray(tm)
    if t.shape != tm.shape:
        raise UserError(f"{path}: t and tm must have the same shape, got {t.shape} and {tm.shape}")
    if t.ndim == 4 and t.shape[0] == 0:
        raise UserError(f"{path} holds no trigger (K = 0); a trigger file holds at least one pattern t and mask tm")
    for name, arr in (("t", t), ("tm", tm)):
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise UserError(f"{path}: {name} holds NaN or infinite values")
    if t.min() < 0 or t.max() > 255:
        raise UserError(f"{path}: t must lie in [0, 255], found values from {t.min():g} to {t.max():g}")
    bad = tm[(tm != 0) & (tm != 1)]
    if bad.size:
        raise UserError(f"{path}: tm must hold only 0 and 1 (1 keeps the pixel), found {bad.flat[0]:g}")


def load_trigger(path, image_size=None):
    """Read the first trigger of a file as float32 (t, tm), each (H, W, 3); check the image size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trigger file not found: {path} (the defaults are BadEncoder's released files in "
                        f"trigger/: restore them with git checkout trigger/)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "t" not in npz.files or "tm" not in npz.files:
                raise UserError(f"{path} lacks key t or tm; expected t (K,H,W,3) in [0,255] and "
                                f"tm (K,H,W,3) 0/1")
            t, tm = npz["t"].astype(np.float32), npz["tm"].astype(np.float32)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read trigger file {path}: {err}") from None
    if t.ndim == 3:
        t, tm = t[None], tm[None]
    check_trigger(t, tm, path)
    if t.ndim != 4 or t.shape[-1] != 3 or t.shape != tm.shape:
        raise UserError(f"{path}: t and tm must both be (K, H, W, 3), got {t.shape} and {tm.shape}")
    if image_size is not None and tuple(t.shape[1:3]) != tuple(image_size):
        raise UserError(f"trigger {path} is {t.shape[1]}x{t.shape[2]} but the images are "
                        f"{image_size[0]}x{image_size[1]}")
    return t[0], tm[0]


class PatchTrigger:
    """A trigger file's patch, stamped as x * tm + t (BadEncoder's trigger)."""
    kind = "patch"

    def __init__(self, path, image_size=None):
        self.path = str(path)
        self.t, self.tm = load_trigger(path, image_size)

    def apply(self, x):
        """uint8 NxHxWx3 (or HxWx3) -> the same with the patch stamped."""
        return stamp_trigger(x, self.t, self.tm)

    def describe(self):
        return {"kind": self.kind, "file": self.path, "patched_pixels": int((self.tm[..., 0] == 0).sum())}


class FrequencyTrigger:
    """CTRL's frequency-domain trigger (datasets/frequency.py) with its parameters."""
    kind = "ctrl"

    def __init__(self, magnitude=CTRL_MAGNITUDE, window_size=CTRL_WINDOW, positions=CTRL_POSITIONS,
                 channels=CTRL_CHANNELS, image_size=None):
        self.magnitude, self.window_size = float(magnitude), int(window_size)
        self.positions = tuple(tuple(int(v) for v in p) for p in positions)
        self.channels = tuple(int(c) for c in channels)
        if image_size is not None:      # a bad window or position is refused now, before any work
            self.check(image_size)

    def check(self, image_size):
        """Refuse (UserError) a window or position that does not fit images of image_size (H, W)."""
        height, width = image_size
        windows = fitting_windows(height, width, self.positions)
        if self.window_size not in windows:
            fits = f"here {', '.join(map(str, windows))}" if windows else "none does"
            positions = ", ".join(map(str, self.positions))
            raise UserError(f"CTRL trigger: window size {self.window_size} does not fit {height}x{width} images; "
                            f"the window must divide the height and width and hold the DCT positions {positions} "
                            f"(so be at least {smallest_window(self.positions)}): {fits}")
        try:
            frequency_trigger(np.zeros((1, height, width, 3), dtype=np.uint8), self.magnitude, self.window_size,
                              self.positions, self.channels)
        except ValueError as err:
            raise UserError(f"CTRL trigger: {err}") from None

    def apply(self, x):
        """uint8 NxHxWx3 (or HxWx3) -> the same with the trigger added, batched."""
        return frequency_trigger(x, self.magnitude, self.window_size, self.positions, self.channels)

    def describe(self):
        return {"kind": self.kind, "magnitude": self.magnitude, "window_size": self.window_size,
                "positions": [list(p) for p in self.positions], "channels": list(self.channels),
                "color_space": "YUV (BT.601)", "transform": "orthonormal 2-D DCT-II per window"}


TRIGGER_KINDS = (PatchTrigger.kind, FrequencyTrigger.kind)


def make_trigger(kind, trigger_file=None, magnitude=CTRL_MAGNITUDE, window_size=CTRL_WINDOW, image_size=None):
    """The trigger of a stage's flags: kind "patch" reads trigger_file, "ctrl" is the frequency trigger."""
    if kind == PatchTrigger.kind:
        return PatchTrigger(trigger_file, image_size)
    if kind == FrequencyTrigger.kind:
        return FrequencyTrigger(magnitude, window_size, image_size=image_size)
    raise UserError(f"unknown trigger kind {kind!r}; choose among {', '.join(TRIGGER_KINDS)}")
