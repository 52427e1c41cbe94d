"""SimCLR encoder for 32x32 inputs, in the state-dict layout of the published checkpoints.

    f.f.0 conv1 (3x3, stride 1)  f.f.1 bn1  f.f.2 relu  f.f.3..6 layer1..4  f.f.7 avgpool
    g.0 Linear(d, 512, no bias)  g.1 BatchNorm1d  g.2 ReLU  g.3 Linear(512, 128)

`width` is the base width (64 for the paper's network; smaller for CPU runs); the
feature dimension d is 8 * width for ResNet-18/34 and 32 * width for ResNet-50.

Initialisation follows the authors, who build the backbone from torchvision's resnet18()
(34, 50): every backbone conv is kaiming-normal (fan_out, relu) and every BatchNorm has
weight 1 and bias 0, except conv1, which is replaced afterwards by a fresh 3x3 conv with
PyTorch's default init; the head g is built last, with PyTorch's default init. At width 64
the modules are created and initialised in torchvision's order, so under the same seed the
weights equal the authors' bit for bit. init="pytorch" re-initialises every backbone conv and
BatchNorm with PyTorch's defaults instead (this project's construction before it followed the
authors; the flag --init of stages 0 and 2).
"""
import copy
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from utils.errors import UserError
from utils.files import check_tensors, load_checkpoint

ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
BLOCKS = ("layer1", "layer2", "layer3", "layer4")
BLOCK_INDEX = (3, 4, 5, 6)  # positions of layer1..4 in the backbone Sequential
INITS = ("torchvision", "pytorch")


class _TorchvisionResNet(ResNet):
    """torchvision's ResNet with base width `width` in place of the 64 its __init__ hard-codes.

    Same modules created in the same order (the 7x7 conv1 and the fc too, which the backbone
    drops, because their default init draws from the random generator), then torchvision's init
    loop; layers come from torchvision's own _make_layer. At width 64 this is resnet18/34/50().
    """

    def __init__(self, block, depths, width):
        nn.Module.__init__(self)  # replaces ResNet.__init__, which would build a width-64 network
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, depths[0])
        self.layer2 = self._make_layer(block, 2 * width, depths[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, depths[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class Backbone(nn.Module):
    """ResNet without max-pool and fc; output after global average pooling."""

    def __init__(self, arch="resnet18", width=64, init="torchvision"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {init!r}")
        block, depths = ARCHS[arch]
        net = _TorchvisionResNet(block, depths, width)
        # Created after the whole ResNet, as the authors do, so it draws from the generator last.
        conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.f = nn.Sequential(conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3,
                               net.layer4, net.avgpool)
        self.feature_dim = 8 * width * block.expansion
        if init == "pytorch":
            for m in self.f.modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.reset_parameters()

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

    def __init__(self, arch="resnet18", width=64, proj_dim=128, init="torchvision"):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
        self.config = {"arch": arch, "width": width, "proj_dim": proj_dim}   # init matters only when built
        self.f = Backbone(arch, width, init)
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


def build_encoder(config, init="torchvision"):
    """Rebuild an encoder from the `arch` dict stored in our checkpoints (init: see INITS)."""
    return SimCLR(config.get("arch", "resnet18"), config.get("width", 64), config.get("proj_dim", 128), init)


def freeze_batchnorm(module):
    """Keep every BatchNorm of `module` fixed, as the attacks that fine-tune an encoder do (BadEncoder,
    DRUPE): eval mode (running statistics neither used from the batch nor updated) and affine
    parameters out of training. Call it again after each module.train()."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.requires_grad_(False)


def attack_copy(clean, lr, momentum, weight_decay):
    """A trainable copy of the frozen clean encoder for an attack that fine-tunes it (BadEncoder,
    DRUPE): only its backbone f trains, with BatchNorm frozen and the head g carried over, by SGD.
    Returns (model, optimizer)."""
    model = copy.deepcopy(clean).requires_grad_(True)
    model.g.requires_grad_(False)
    freeze_batchnorm(model.f)
    params = [p for p in model.f.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def encoder_checkpoint(model, **extra):
    """The dict we save: weights plus the constructor arguments that rebuild the model."""
    return {"state_dict": model.state_dict(), "arch": dict(model.config), **extra}


def _strip_prefix(state_dict):
    """Drop the 'module.' that DataParallel/DDP checkpoints add to every key."""
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _bn_shapes(prefix, channels):
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def expected_shapes(config):
    """{key: shape} of the state_dict of build_encoder(config), worked out without building it, so a
    checkpoint's keys and shapes are checked against its metadata before anything is allocated.
    Mirrors torchvision's _make_layer (tests/test_integrity.py checks it against the real model)."""
    block, depths = ARCHS[config["arch"]]
    width, proj_dim = config["width"], config["proj_dim"]
    shapes = {"f.f.0.weight": (width, 3, 3, 3), **_bn_shapes("f.f.1", width)}
    inplanes = width
    for index, planes, depth, stride in zip(BLOCK_INDEX, (width, 2 * width, 4 * width, 8 * width), depths,
                                            (1, 2, 2, 2)):
        out = planes * block.expansion
        for b in range(depth):
            p = f"f.f.{index}.{b}"
            if block is Bottleneck:
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (out, planes, 1, 1)]
            else:
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            for i, shape in enumerate(convs, 1):
                shapes[f"{p}.conv{i}.weight"] = shape
                shapes.update(_bn_shapes(f"{p}.bn{i}", shape[0]))
            if b == 0 and (stride != 1 or inplanes != out):
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                shapes.update(_bn_shapes(f"{p}.downsample.1", out))
            inplanes = out
    d = 8 * width * block.expansion
    shapes.update({"g.0.weight": (512, d), **_bn_shapes("g.1", 512), "g.3.weight": (proj_dim, 512),
                   "g.3.bias": (proj_dim,)})
    return shapes


def check_keys(state_dict, config, path, expected=None):
    """Raise a short, readable error if the checkpoint's keys and shapes are not those of the
    encoder its metadata describes (missing, unexpected and mis-shaped keys, three of each).
    expected: {key: shape}, by default expected_shapes(config); a built model passes its own."""
    expected = expected_shapes(config) if expected is None else expected
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v)}" for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise UserError(f"{path} does not match a {config['arch']} encoder of width {config['width']}: "
                        + "; ".join(parts))


def _bounded_int(value, name, high, path):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
        raise UserError(f"{path}: {name} must be an integer from 1 to {high}, got {value!r}")
    return int(value)


def _layout_arch(state_dict):
    """The architecture the keys belong to: bottleneck convs mean ResNet-50, a third layer1 block ResNet-34."""
    if "f.f.3.0.conv3.weight" in state_dict:
        return "resnet50"
    return "resnet34" if "f.f.3.2.conv1.weight" in state_dict else "resnet18"


def check_encoder_checkpoint(ckpt, path, max_width=1024, max_proj_dim=65536):
    """Validate a loaded encoder checkpoint before any model is built; return its config
    {'arch', 'width', 'proj_dim'}.

    ckpt: what utils.files.load_checkpoint returned: our dict (state_dict + arch), or BadEncoder's
    release (weights at the top level or under 'state_dict', no 'arch', keys maybe 'module.'-prefixed).
    Width and projection size are bounded, and the keys and shapes must be those of the network
    the metadata describes, so a file that claims a huge network is refused at once instead of
    allocating it.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not an encoder checkpoint (expected a dict with 'state_dict', "
                        f"got a {type(ckpt).__name__})")
    state_dict = ckpt.get("state_dict", ckpt)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: its 'state_dict' is a {type(state_dict).__name__}, not a dict of tensors")
    state_dict = _strip_prefix(state_dict)
    if "f.f.0.weight" not in state_dict:
        raise UserError(f"{path} has no SimCLR encoder weights (expected keys f.f.0.weight, ..., g.3.bias)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a "
                            f"tensor; this is not an encoder checkpoint")
    check_tensors(state_dict, path)
    stem = state_dict["f.f.0.weight"]
    if stem.ndim != 4 or stem.shape[1] != 3:
        raise UserError(f"{path}: f.f.0.weight has shape {tuple(stem.shape)}; expected (width, 3, 3, 3)")
    head = state_dict.get("g.3.weight")
    layout = _layout_arch(state_dict)

    arch = ckpt.get("arch")
    if arch is None:
        config = {"arch": layout, "width": stem.shape[0],
                  "proj_dim": head.shape[0] if head is not None else 128}
    elif isinstance(arch, dict):
        config = {"arch": arch.get("arch", "resnet18"), "width": arch.get("width", 64),
                  "proj_dim": arch.get("proj_dim", 128)}
    else:
        raise UserError(f"{path}: its 'arch' entry must be a dict such as {{'arch': 'resnet18', "
                        f"'width': 64, 'proj_dim': 128}}, got a {type(arch).__name__}")
    if not isinstance(config["arch"], str) or config["arch"] not in ARCHS:
        raise UserError(f"{path}: arch {config['arch']!r} is not one of {', '.join(ARCHS)}")
    config["width"] = _bounded_int(config["width"], "width", max_width, path)
    config["proj_dim"] = _bounded_int(config["proj_dim"], "proj_dim", max_proj_dim, path)
    if config["arch"] != layout:
        raise UserError(f"{path}: arch says {config['arch']} but the weights have the layout of {layout}")
    if config["width"] != stem.shape[0]:
        raise UserError(f"{path}: arch says width {config['width']} but f.f.0.weight has "
                        f"{stem.shape[0]} channels")
    if head is not None and config["proj_dim"] != head.shape[0]:
        raise UserError(f"{path}: arch says proj_dim {config['proj_dim']} but g.3.weight has "
                        f"{head.shape[0]} rows")
    check_keys(state_dict, config, path)
    return config


def load_encoder(path, arch=None, width=None):
    """Load an encoder checkpoint (ours or BadEncoder's) weights-only, strictly; returns (model, ckpt).

    arch/width, when given, must agree with the checkpoint: a mismatch is an error that names the
    differing keys, not a silent partial load.
    """
    ckpt = load_checkpoint(path)
    config = check_encoder_checkpoint(ckpt, path)      # types and sizes, before anything is built
    state_dict = _strip_prefix(ckpt.get("state_dict", ckpt))
    if arch is not None or width is not None:          # the caller's architecture: its keys must fit too
        config.update({k: v for k, v in (("arch", arch), ("width", width)) if v is not None})
        check_keys(state_dict, config, path)            # the model is built only once the keys fit
    model = build_encoder(config)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict)
    return model, ckpt


def check_state_dict(model, state_dict, path):
    """Raise a short, readable error if the checkpoint does not fit the built model exactly."""
    check_keys(state_dict, model.config, path, {k: v.shape for k, v in model.state_dict().items()})
