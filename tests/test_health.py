"""Non-finite encoders are never kept, and their features never scored."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models import SimCLR
from utils.logs import check_finite
from models.health import check_finite_encoder, check_finite_features
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_finite_encoder_passes_and_keeps_modes():
    model = SimCLR(width=4).train()
    model.g.eval()
    check_finite_encoder(model, 32, torch.device("cpu"), "clean")
    assert model.training and model.f.training and not model.g.training and not model.g[1].training


def test_nan_weights_are_caught():
    model = SimCLR(width=4)
    with torch.no_grad():
        model.f.f[3][0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError) as err:
        check_finite_encoder(model, 32, torch.device("cpu"), "mimic")
    assert str(err.value) == ("the mimic encoder has non-finite weights (NaN/inf) after training; it was not "
                              "saved as a result. Lower --lr and run again")


def test_nan_features_from_finite_weights_are_caught():
    model = SimCLR(width=4).train()
    model.f.f[1].running_var.fill_(-1.0)       # finite, but sqrt(-1) in eval mode gives NaN features
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    with pytest.raises(UserError) as err:
        check_finite_encoder(model, (16, 24), torch.device("cpu"), "backdoored")
    assert str(err.value) == ("the backdoored encoder has non-finite features (NaN/inf) after training; it was "
                              "not saved as a result. Lower --lr and run again")
    assert model.training


def test_finite_features_and_loss():
    check_finite_features(torch.ones(3, 4), "the test set", "m.pth")
    for feats in (torch.tensor([[1.0, float("nan")]]), np.array([[np.inf]])):
        with pytest.raises(UserError) as err:
            check_finite_features(feats, "the triggered test set", "m.pth")
        assert str(err.value) == ("the encoder m.pth gives non-finite features on the triggered test set; it "
                                  "cannot be scored (a broken encoder is not a removed backdoor)")
    check_finite(0.5, 1, what="downstream classifier's loss")
    with pytest.raises(UserError) as err:
        check_finite(torch.tensor(float("inf")), 3, what="downstream classifier's loss")
    assert str(err.value) == ("the downstream classifier's loss became inf at epoch 3; stopped. Lower --lr "
                              "and run again")
