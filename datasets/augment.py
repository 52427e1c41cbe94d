"""SimCLR augmentations.

`BatchAugment` applies RandomResizedCrop, horizontal flip, ColorJitter (random order per image,
applied with probability p) and RandomGrayscale to a whole batch at once on the batch's device,
with independent random parameters per image drawn from torch's global generator (so seeds and
resumed runs reproduce them). It follows torchvision's definitions of each operation; the crop
is resampled bilinearly by one grid_sample, which also performs the flip.

`torchvision_pipeline` is the per-image torchvision pipeline of the paper's code, for the
DataLoader path (`--augment torchvision`).
"""
import math

import torch
import torch.nn.functional as F
from torchvision import transforms

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def normalize(x, mean, std):
    """Bx3xHxW in [0, 1] -> (x - mean) / std per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def grayscale(x):
    """Bx3xHxW -> Bx1xHxW luma."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def rgb_to_hsv(x):
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    h = torch.where(maxc == r, ((g - b) / safe_delta) % 6,
                    torch.where(maxc == g, (b - r) / safe_delta + 2, (r - g) / safe_delta + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x):
    h, s, v = x.unbind(dim=1)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # For each sextant i, (r, g, b) is a fixed arrangement of (v, q, p, t).
    table = torch.stack([torch.stack(c, dim=1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], dim=1)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, *i.shape[1:])).squeeze(1)


def _blend(x, other, factor):
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def adjust_hue(x, f):
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _uniform(n, low, high):
    return torch.rand(n) * (high - low) + low


def crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop boxes for n images: (top, left, h, w), each an n-vector of ints.

    As torchvision: up to `tries` draws of area and aspect ratio per image; an image with no
    valid draw gets the central crop with the aspect ratio clamped to `ratio`.
    """
    area = height * width
    target = area * _uniform(n * tries, *scale).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]))).view(n, tries)
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(dim=1)
    found = ok.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    top = (torch.rand(n) * (height - h + 1).float()).floor().long()
    left = (torch.rand(n) * (width - w + 1).float()).floor().long()
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return top, left, h, w


def resized_crop(x, top, left, h, w, flip, size):
    """Crop each image to its box, resize bilinearly to size x size and mirror where flip is set."""
    n, _, height, width = x.shape
    cx = (left.float() + w.float() / 2) / width * 2 - 1
    cy = (top.float() + h.float() / 2) / height * 2 - 1
    sx = w.float() / width * torch.where(flip, -1.0, 1.0)
    sy = h.float() / height
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchAugment:
    """SimCLR augmentation of a batch: uint8 BxHxWx3 (or float Bx3xHxW in [0,1]) -> normalised."""

    def __init__(self, size, mean, std, crop=True, scale=(0.08, 1.0), flip_p=0.5,
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2):
        self.size, self.mean, self.std = size, mean, std
        self.crop, self.scale, self.flip_p = crop, scale, flip_p
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p

    def __call__(self, x, params=None):
        """Augment x; params (from sample(), one row per image of x) default to fresh draws."""
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div_(255)
        p = self.sample(len(x), x.shape[2], x.shape[3]) if params is None else params
        x = resized_crop(x, p["top"], p["left"], p["h"], p["w"], p["flip"], self.size)
        x = self._color_jitter(x, p)
        gray = p["gray"].to(x.device)
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        return normalize(x, self.mean, self.std)

    def sample(self, n, height, width):
        """Random parameters for n images of height x width, drawn on the CPU from torch's global
        generator: a dict of tensors with one row per image, so {k: v[rows]} augments a subset."""
        flip = torch.rand(n) < self.flip_p
        if self.crop:
            top, left, h, w = crop_boxes(n, height, width, self.scale)
        else:
            top, left = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
            h, w = torch.full((n,), height), torch.full((n,), width)
        b, c, s, hue = self.jitter
        factors = torch.stack([_uniform(n, max(0, 1 - b), 1 + b), _uniform(n, max(0, 1 - c), 1 + c),
                               _uniform(n, max(0, 1 - s), 1 + s), _uniform(n, -hue, hue)], dim=1)
        apply = torch.rand(n) < self.jitter_p
        order = torch.argsort(torch.rand(n, 4), dim=1)   # each image its own order of the 4 ops
        gray = torch.rand(n) < self.gray_p
        return {"flip": flip, "top": top, "left": left, "h": h, "w": w, "factors": factors,
                "apply": apply, "order": order, "gray": gray}

    def _color_jitter(self, x, p):
        factors, apply, order = p["factors"].to(x.device), p["apply"], p["order"]
        for position in range(4):
            for op_index, op in enumerate(JITTER_OPS):
                idx = torch.nonzero(apply & (order[:, position] == op_index)).squeeze(1)
                if len(idx):
                    idx = idx.to(x.device)
                    x[idx] = op(x[idx], factors[idx, op_index])
        return x


def torchvision_pipeline(size, mean, std):
    """The per-image pipeline of the paper's code (PIL image -> normalised tensor)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
