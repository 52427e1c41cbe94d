"""SimCLR encoder for 32x32 inputs, in the state-dict layout of the published checkpoints.

    f.f.0 conv1 (3x3, stride 1)  f.f.1 bn1  f.f.2 relu  f.f.3..6 layer1..4  f.f.7 avgpool
    g.0 Linear(d, 512, no bias)  g.1 BatchNorm1d  g.2 ReLU  g.3 Linear(512, 128)

`width` is the base width (64 for the paper's network; smaller for CPU runs); the
feature dimension d is 8 * width for ResNet-18/34 and 32 * width for ResNet-50.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils.errors import UserError
from utils.files import load_checkpoint

ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
BLOCKS = ("layer1", "layer2", "layer3", "layer4")
BLOCK_INDEX = (3, 4, 5, 6)  # positions of layer1..4 in the backbone Sequential


def _make_layer(block, inplanes, planes, n, stride):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, n)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """ResNet without max-pool and fc; output after global average pooling."""

    def __init__(self, arch="resnet18", width=64):
        super().__init__()
        block, depths = ARCHS[arch]
        layers = [nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True)]
        inplanes = width
        for i, n in enumerate(depths):
            planes = width * 2 ** i
            layers.append(_make_layer(block, inplanes, planes, n, stride=1 if i == 0 else 2))
            inplanes = planes * block.expansion
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.f = nn.Sequential(*layers)
        self.feature_dim = inplanes

    def forward(self, x, return_blocks=False):
        """x: Bx3xHxW -> feature BxD (and the outputs of layer1..4 when return_blocks)."""
        blocks = []
        for i, module in enumerate(self.f):
            x = module(x)
            if i in BLOCK_INDEX:
                blocks.append(x)
        feature = torch.flatten(x, 1)
        return (feature, blocks) if return_blocks else feature


class SimCLR(nn.Module):
    """Backbone f and projection head g; forward returns L2-normalised feature and projection."""

    def __init__(self, arch="resnet18", width=64, proj_dim=128):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
        self.config = {"arch": arch, "width": width, "proj_dim": proj_dim}
        self.f = Backbone(arch, width)
        d = self.f.feature_dim
        self.g = nn.Sequential(nn.Linear(d, 512, bias=False), nn.BatchNorm1d(512),
                               nn.ReLU(inplace=True), nn.Linear(512, proj_dim))

    @property
    def feature_dim(self):
        return self.f.feature_dim

    def forward(self, x, return_blocks=False):
        """x: Bx3xHxW -> (feature BxD, projection Bx128), both unit length; + block outputs."""
        feature, blocks = self.f(x, return_blocks=True)
        out = self.g(feature)
        result = (F.normalize(feature, dim=-1), F.normalize(out, dim=-1))
        return result + (blocks,) if return_blocks else result


def build_encoder(config):
    """Rebuild an encoder from the `arch` dict stored in our checkpoints."""
    return SimCLR(config.get("arch", "resnet18"), config.get("width", 64), config.get("proj_dim", 128))


def encoder_checkpoint(model, **extra):
    """The dict we save: weights plus the constructor arguments that rebuild the model."""
    return {"state_dict": model.state_dict(), "arch": dict(model.config), **extra}


def _infer_config(state_dict):
    """Guess arch and width of a checkpoint without an `arch` entry (e.g. BadEncoder's releases)."""
    width = state_dict["f.f.0.weight"].shape[0]
    arch = "resnet50" if "f.f.3.0.conv3.weight" in state_dict else (
        "resnet34" if "f.f.3.2.conv1.weight" in state_dict else "resnet18")
    proj_dim = state_dict["g.3.weight"].shape[0] if "g.3.weight" in state_dict else 128
    return {"arch": arch, "width": width, "proj_dim": proj_dim}


def _strip_prefix(state_dict):
    """Drop the 'module.' that DataParallel/DDP checkpoints add to every key."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_encoder(path, arch=None, width=None):
    """Load an encoder checkpoint (ours or BadEncoder's) weights-only, strictly; returns (model, ckpt).

    arch/width, when given, must agree with the checkpoint: a mismatch is an error that names the
    differing keys, not a silent partial load.
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not an encoder checkpoint (expected a dict with 'state_dict')")
    state_dict = ckpt.get("state_dict", ckpt)
    state_dict = _strip_prefix(state_dict) if isinstance(state_dict, dict) else {}
    if "f.f.0.weight" not in state_dict:
        raise UserError(f"{path} has no SimCLR encoder weights (expected keys f.f.0.weight, ..., g.3.bias)")
    config = dict(ckpt.get("arch") or _infer_config(state_dict))
    if arch is not None:
        config["arch"] = arch
    if width is not None:
        config["width"] = width
    model = build_encoder(config)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict)
    return model, ckpt


def check_state_dict(model, state_dict, path):
    """Raise a short, readable error if the checkpoint does not fit the model exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        c = model.config
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise UserError(f"{path} does not match a {c['arch']} encoder of width {c['width']}: "
                        + "; ".join(parts))
