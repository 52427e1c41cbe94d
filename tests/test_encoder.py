"""The encoder's state-dict layout matches the published checkpoints; loading is strict."""
import pytest
import torch

from models import SimCLR, load_encoder
from utils.errors import UserError


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
