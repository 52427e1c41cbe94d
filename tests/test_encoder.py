"""The encoder's state-dict layout and initialisation match the authors'; loading is strict."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import models.encoder
from models import SimCLR, encoder_checkpoint, load_encoder
from models.encoder import check_encoder_checkpoint
from utils.errors import UserError
from utils.files import load_checkpoint, save_checkpoint


def test_state_dict_keys_and_shapes_match_published_layout():
    sd = SimCLR().state_dict()
    expected = {
        "f.f.0.weight": (64, 3, 3, 3),             # 3x3 stride-1 stem, no bias
        "f.f.1.weight": (64,),
        "f.f.3.0.conv1.weight": (64, 64, 3, 3),     # layer1
        "f.f.4.0.downsample.0.weight": (128, 64, 1, 1),
        "f.f.6.1.conv2.weight": (512, 512, 3, 3),   # layer4
        "g.0.weight": (512, 512),                   # Linear(512, 512, no bias)
        "g.1.running_mean": (512,),                 # BatchNorm1d
        "g.3.weight": (128, 512),
        "g.3.bias": (128,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "f.f.0.bias" not in sd and "g.0.bias" not in sd
    assert not any(k.startswith(("f.f.7", "f.f.8", "fc")) for k in sd)   # avgpool has no weights
    assert len(sd) == 128


def test_forward_returns_unit_features_projection_and_blocks():
    model = SimCLR(width=8).eval()
    feature, proj, blocks = model(torch.randn(3, 3, 32, 32), return_blocks=True)
    assert feature.shape == (3, 64) and proj.shape == (3, 128)
    assert torch.allclose(feature.norm(dim=1), torch.ones(3), atol=1e-5)
    assert [tuple(b.shape[1:]) for b in blocks] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]


def test_badencoder_release_layout_loads(tmp_path):
    """A dict with epoch, state_dict and optimizer, and no arch entry, as BadEncoder released."""
    model = SimCLR(width=16)
    path = tmp_path / "model_200.pth"
    torch.save({"epoch": 200, "state_dict": model.state_dict(),
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, path)
    loaded, ckpt = load_encoder(path)
    assert loaded.config == {"arch": "resnet18", "width": 16, "proj_dim": 128}
    assert ckpt["epoch"] == 200
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_module_prefix_from_data_parallel_is_stripped(tmp_path):
    model = SimCLR(width=8)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, _ = load_encoder(path)
    assert torch.equal(loaded.state_dict()["f.f.0.weight"], model.state_dict()["f.f.0.weight"])


def test_architecture_mismatch_names_the_differing_keys(tmp_path):
    path = tmp_path / "w8.pth"
    torch.save({"state_dict": SimCLR(width=8).state_dict()}, path)
    with pytest.raises(UserError, match=r"does not match a resnet18 encoder of width 16: shape: f\.f\.0\.weight"):
        load_encoder(path, width=16)
    with pytest.raises(UserError, match=r"resnet34 .*missing: f\.f\.3\.2\.conv1\.weight"):
        load_encoder(path, arch="resnet34")


@pytest.mark.parametrize("arch, feature_dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_width_64_init_equals_the_authors_construction_bit_for_bit(arch, feature_dim):
    """The authors: torchvision's resnet, then a fresh 3x3 conv1 in its place, max-pool and fc
    dropped, then the head g; every module draws from the generator in that order."""
    torch.manual_seed(7)
    ours = SimCLR(arch, 64).state_dict()
    torch.manual_seed(7)
    net = getattr(torchvision.models, arch)()
    f = []
    for name, module in net.named_children():
        if name == "conv1":
            module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
            f.append(module)
    f = nn.Sequential(*f)
    g = nn.Sequential(nn.Linear(feature_dim, 512, bias=False), nn.BatchNorm1d(512),
                      nn.ReLU(inplace=True), nn.Linear(512, 128))
    authors = {**{f"f.f.{k}": v for k, v in f.state_dict().items()},
               **{f"g.{k}": v for k, v in g.state_dict().items()}}
    assert list(ours) == list(authors)
    for key, value in authors.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_narrow_backbone_has_torchvision_init(arch):
    torch.manual_seed(0)
    model = SimCLR(arch, 16)
    convs = [(name, m) for name, m in model.f.f.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (20 if arch == "resnet18" else 53)
    stem, bound = convs[0][1].weight, 1 / math.sqrt(3 * 3 * 3)   # PyTorch's default: U(-bound, bound)
    assert convs[0][0] == "0" and 0.9 * bound < stem.abs().max() <= bound
    for name, conv in convs[1:]:                                  # kaiming normal, fan_out, relu
        w = conv.weight
        expected = math.sqrt(2 / (w.shape[0] * w.shape[2] * w.shape[3]))
        assert abs(w.std().item() / expected - 1) < 0.15, name
        assert abs(w.mean().item()) < 0.2 * expected, name
    bns = [m for m in model.f.f.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(convs)
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    feature, proj = model.eval()(torch.randn(2, 3, 32, 32))
    assert model.feature_dim == (128 if arch == "resnet18" else 512) and feature.shape[1] == model.feature_dim
    assert proj.shape == (2, 128)


def _block_stds(model, x):
    with torch.no_grad():
        _, _, blocks = model.eval()(x, return_blocks=True)
    return torch.tensor([b.std().item() for b in blocks])


def test_untrained_layer_outputs_grow_with_depth_unlike_default_init():
    """Fresh BN in eval mode is the identity, so the block outputs show the init's scale: with
    torchvision's init their std grows with depth (about 0.66/0.94/1.26/1.54 at width 16), with
    PyTorch's default init it shrinks (about 0.33/0.15/0.07/0.03). Means over 8 networks (whose
    stds vary) and, re-initialised the default way, over 2 of them (whose stds barely vary)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    models = [SimCLR("resnet18", 16) for _ in range(8)]
    ours = torch.stack([_block_stds(m, x) for m in models]).mean(0)
    assert (ours.diff() > 0.05).all(), ours
    assert 0.5 < ours[0] < 0.9 and ours[3] > 1.0, ours
    models = [SimCLR("resnet18", 16, init="pytorch") for _ in range(2)]      # the --init pytorch flag
    default = torch.stack([_block_stds(m, x) for m in models]).mean(0)
    assert (default.diff() < 0).all() and default[3] < 0.1, default


def test_init_pytorch_gives_every_backbone_conv_the_default_uniform_init():
    torch.manual_seed(0)
    model = SimCLR("resnet18", 16, init="pytorch")
    for name, conv in model.f.f.named_modules():
        if isinstance(conv, nn.Conv2d):             # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ...)
            w = conv.weight
            bound = 1 / math.sqrt(w[0].numel())
            assert 0.9 * bound < w.abs().max() <= bound, name


@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build an encoder fails the test: the checks must refuse before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(models.encoder, "build_encoder", refuse)
    monkeypatch.setattr(models.encoder, "SimCLR", refuse)


def small_ckpt(**arch):
    ckpt = encoder_checkpoint(SimCLR(width=4))
    ckpt["arch"].update(arch)
    return ckpt


def test_valid_checkpoints_give_their_config():
    ours = small_ckpt()
    assert check_encoder_checkpoint(ours, "a.pth") == {"arch": "resnet18", "width": 4, "proj_dim": 128}
    # BadEncoder's release layout: weights at the top level, DataParallel prefix, no arch entry
    released = {f"module.{k}": v for k, v in SimCLR("resnet34", width=2, proj_dim=16).state_dict().items()}
    assert check_encoder_checkpoint(released, "r.pth") == {"arch": "resnet34", "width": 2, "proj_dim": 16}
    wide50 = {"state_dict": SimCLR("resnet50", width=2).state_dict()}
    assert check_encoder_checkpoint(wide50, "r50.pth") == {"arch": "resnet50", "width": 2, "proj_dim": 128}


def test_huge_claimed_width_is_refused_fast_without_building(tmp_path, no_build):
    path = tmp_path / "huge.pth"
    save_checkpoint(path, small_ckpt(width=20000))
    with pytest.raises(UserError) as err:         # no_build: refused before any model exists
        check_encoder_checkpoint(load_checkpoint(path), path)
    assert str(err.value) == f"{path}: width must be an integer from 1 to 1024, got 20000"
    with pytest.raises(UserError, match=r"proj_dim must be an integer from 1 to 65536, got 1000000000$"):
        check_encoder_checkpoint(small_ckpt(proj_dim=10 ** 9), "p.pth")
    # no arch entry: the width read from the weights is bounded the same way
    stem = {"f.f.0.weight": torch.zeros(20000, 3, 3, 3)}
    with pytest.raises(UserError, match=r"^s.pth: width must be an integer from 1 to 1024, got 20000$"):
        check_encoder_checkpoint(stem, "s.pth")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(arch="resnet18"), "c.pth: its 'arch' entry must be a dict such as {'arch': 'resnet18', "
                                          "'width': 64, 'proj_dim': 128}, got a str"),
    (lambda c: c["arch"].update(arch="vit"), "c.pth: arch 'vit' is not one of resnet18, resnet34, resnet50"),
    (lambda c: c["arch"].update(arch=["resnet18"]), "c.pth: arch ['resnet18'] is not one of resnet18, resnet34, "
                                                    "resnet50"),
    (lambda c: c["arch"].update(width=-4), "c.pth: width must be an integer from 1 to 1024, got -4"),
    (lambda c: c["arch"].update(width=8.5), "c.pth: width must be an integer from 1 to 1024, got 8.5"),
    (lambda c: c["arch"].update(width="8"), "c.pth: width must be an integer from 1 to 1024, got '8'"),
    (lambda c: c["arch"].update(width=True), "c.pth: width must be an integer from 1 to 1024, got True"),
    (lambda c: c["arch"].update(width=8), "c.pth: arch says width 8 but f.f.0.weight has 4 channels"),
    (lambda c: c["arch"].update(proj_dim=64), "c.pth: arch says proj_dim 64 but g.3.weight has 128 rows"),
    (lambda c: c["arch"].update(arch="resnet50"), "c.pth: arch says resnet50 but the weights have the layout "
                                                  "of resnet18"),
    (lambda c: c["state_dict"].update({"g.3.bias": [0.0] * 128}),
     "c.pth: state_dict entry 'g.3.bias' is a list, not a tensor; this is not an encoder checkpoint"),
    (lambda c: c["state_dict"].pop("f.f.0.weight"),
     "c.pth has no SimCLR encoder weights (expected keys f.f.0.weight, ..., g.3.bias)"),
    (lambda c: c.update(state_dict=[1, 2]), "c.pth: its 'state_dict' is a list, not a dict of tensors"),
    (lambda c: c["state_dict"].update({"f.f.0.weight": torch.zeros(4, 3)}),
     "c.pth: f.f.0.weight has shape (4, 3); expected (width, 3, 3, 3)"),
])
def test_bad_checkpoints_are_refused_before_building(change, message, no_build):
    ckpt = small_ckpt()
    change(ckpt)
    with pytest.raises(UserError) as err:
        check_encoder_checkpoint(ckpt, "c.pth")
    assert str(err.value) == message


def test_non_dict_checkpoint(no_build):
    with pytest.raises(UserError) as err:
        check_encoder_checkpoint([1, 2], "l.pth")
    assert str(err.value) == "l.pth is not an encoder checkpoint (expected a dict with 'state_dict', got a list)"
