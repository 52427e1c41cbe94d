"""The frequency-domain trigger of CTRL (Li et al., "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV 2023), as pure batched tensor functions.

The trigger adds a constant to chosen DCT coefficients of the chrominance channels (U, V) of every
window of the image. It is spread over the whole image rather than held by a patch, so crops keep it,
and the eye is less sensitive to mid and high frequencies of chrominance than to a luminance patch.

Convention: images on the 0-255 scale; float tensors are NxCxHxW, stored images uint8 NxHxWx3 RGB.
"""
import math

import numpy as np
import torch

CTRL_MAGNITUDE = 100.0
CTRL_WINDOW = 32
CTRL_POSITIONS = ((15, 15), (31, 31))
CTRL_CHANNELS = (1, 2)          # U and V

# Float64 values held by one chunk (2048 CIFAR-size images, about 50 MB a copy); larger images get fewer per chunk.
_CHUNK_VALUES = 2048 * 32 * 32 * 3

# BT.601 RGB -> YUV, the matrix the authors use.
_RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114],
                            [-0.14713, -0.28886, 0.436],
                            [0.615, -0.51499, -0.10001]], dtype=torch.float64)
# The published inverse (1.13983, 0.39465, 0.58060, 2.03211) is rounded: its product with the forward matrix is
# off the identity by up to 1.6e-5 (0.005 grey levels at 255). The exact inverse makes a trigger of magnitude 0
# a no-op up to float rounding.
_YUV_TO_RGB = torch.linalg.inv(_RGB_TO_YUV)


def dct_matrix(n, dtype=torch.float64, device=None):
    """The nxn orthonormal DCT-II matrix D: D[k, i] = a_k cos(pi (2i + 1) k / (2n)), a_0 = sqrt(1/n), a_k = sqrt(2/n).

    D @ x is the 1-D DCT of a column vector x; D is orthogonal, so D.T @ X inverts it."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def smallest_window(positions=CTRL_POSITIONS):
    """The smallest window holding every DCT position (row, col)."""
    return 1 + max((max(p) for p in positions), default=0)


def fitting_windows(height, width, positions=CTRL_POSITIONS):
    """The window sizes the trigger fits on HxW images: those dividing both sides and holding every
    DCT position inside the window."""
    return [w for w in range(smallest_window(positions), min(height, width) + 1)
            if height % w == 0 and width % w == 0]


def _check_window(height, width, window):
    if window < 1 or height % window or width % window:
        raise ValueError(f"window_size {window} must divide the image height and width, got {height}x{width}")


def _windows(x, window):
    """NxCxHxW -> NxCx(H/w)x(W/w)xwxw, one wxw block per window."""
    n, c, h, w = x.shape
    _check_window(h, w, window)
    return x.reshape(n, c, h // window, window, w // window, window).transpose(3, 4)


def _unwindows(x):
    """NxCx(H/w)x(W/w)xwxw -> NxCxHxW, the inverse of _windows."""
    n, c, rows, cols, window, _ = x.shape
    return x.transpose(3, 4).reshape(n, c, rows * window, cols * window)


def dct2_windows(x, window):
    """Orthonormal 2-D DCT-II of every non-overlapping window x window block of x (NxCxHxW float).

    Returns NxCxHxW with each block replaced by its coefficients, so coefficient (k, l) of a block sits at
    offset (k, l) inside that block."""
    d = dct_matrix(window, x.dtype, x.device)
    return _unwindows(d @ _windows(x, window) @ d.T)


def idct2_windows(x, window):
    """Inverse of dct2_windows: x (NxCxHxW) holds blockwise coefficients; returns the blockwise pixels."""
    d = dct_matrix(window, x.dtype, x.device)
    return _unwindows(d.T @ _windows(x, window) @ d)


def rgb_to_yuv(x):
    """BT.601 RGB -> YUV of x (Nx3xHxW float); same scale in, same scale out (linear, no offsets)."""
    return torch.einsum("ij,njhw->nihw", _RGB_TO_YUV.to(x.dtype).to(x.device), x)


def yuv_to_rgb(x):
    """YUV -> RGB of x (Nx3xHxW float), by the exact inverse of rgb_to_yuv."""
    return torch.einsum("ij,njhw->nihw", _YUV_TO_RGB.to(x.dtype).to(x.device), x)


def _check_positions(positions, channels, window):
    for row, col in positions:
        if not (0 <= row < window and 0 <= col < window):
            raise ValueError(f"position ({row}, {col}) lies outside the {window}x{window} window")
    for channel in channels:
        if channel not in (0, 1, 2):
            raise ValueError(f"channel {channel} is not a YUV channel index (0, 1 or 2)")


def _trigger_float(x, magnitude, window_size, positions, channels):
    """The triggered images of x (NxCxHxW float, 0-255 RGB) as NxCxHxW float in [0, 1], before rounding."""
    coeffs = dct2_windows(rgb_to_yuv(x), window_size)
    for row, col in positions:
        # Offset (row, col) of every window at once: rows row, row + w, ... and likewise for columns.
        coeffs[:, list(channels), row::window_size, col::window_size] += magnitude
    return (yuv_to_rgb(idct2_windows(coeffs, window_size)) / 255).clamp(0, 1)


def frequency_trigger(images, magnitude=CTRL_MAGNITUDE, window_size=CTRL_WINDOW, positions=CTRL_POSITIONS,
                      channels=CTRL_CHANNELS):
    """Stamp the CTRL trigger on uint8 RGB images, NxHxWx3 (or one HxWx3), numpy array or torch tensor.

    Returns uint8 of the same type, shape and device: the triggered image in [0, 1] times 255, rounded to
    nearest. The work is float64, on the CPU for numpy input and on the tensor's device otherwise, in chunks so
    memory stays bounded whatever the number of images."""
    is_numpy = isinstance(images, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(images)) if is_numpy else images
    if x.dtype != torch.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3) or (H, W, 3), got {x.dtype} {tuple(x.shape)}")
    batch = x if x.ndim == 4 else x[None]
    height, width = batch.shape[1:3]
    _check_window(height, width, window_size)
    _check_positions(positions, channels, window_size)

    out = torch.empty_like(batch)
    chunk = max(1, _CHUNK_VALUES // (height * width * 3))
    for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk].permute(0, 3, 1, 2).to(torch.float64)
        triggered = _trigger_float(part, magnitude, window_size, positions, channels)
        # Clamped to [0, 1] already, so the rounded values lie in 0..255.
        out[start:start + chunk] = (triggered * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    out = out if x.ndim == 4 else out[0]
    return out.numpy() if is_numpy else out
