"""Triggers are stamped exactly where the mask says; the default files are the published squares."""
from pathlib import Path

import numpy as np
import pytest

from datasets import load_trigger, make_square_trigger, stamp_trigger
from datasets.trigger import check_trigger
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_stamp_replaces_exactly_the_masked_pixels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (5, 32, 32, 3), dtype=np.uint8)
    t, tm = make_square_trigger(32, 21, 10)
    out = stamp_trigger(x, t[0], tm[0])
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert (out[:, 21:31, 21:31] == 255).all()
    inside = np.zeros((32, 32), dtype=bool)
    inside[21:31, 21:31] = True
    assert np.array_equal(out[:, ~inside], x[:, ~inside])      # every other pixel untouched
    assert (out != x).any(axis=-1).sum(axis=(1, 2)).max() == 100


def test_default_trigger_files_are_the_white_squares():
    t, tm = load_trigger(ROOT / "trigger/trigger_pt_white_21_10_ap_replace.npz", image_size=(32, 32))
    assert t.shape == tm.shape == (32, 32, 3)
    assert set(np.unique(tm)) == {0.0, 1.0} and (tm == 0).sum() == 10 * 10 * 3
    assert (t[21:31, 21:31] == 255).all() and t.sum() == 255 * 300 and (tm[21:31, 21:31] == 0).all()
    t, tm = load_trigger(ROOT / "trigger/trigger_pt_white_173_50_ap_replace.npz", image_size=(224, 224))
    assert (t[173:223, 173:223] == 255).all() and (tm == 0).sum() == 50 * 50 * 3


def test_trigger_of_the_wrong_size_is_refused():
    with pytest.raises(UserError, match=r"trigger .* is 224x224 but the images are 32x32"):
        load_trigger(ROOT / "trigger/trigger_pt_white_173_50_ap_replace.npz", image_size=(32, 32))


def test_missing_trigger_says_how_to_regenerate(tmp_path):
    with pytest.raises(UserError, match="python -m datasets.make_triggers"):
        load_trigger(tmp_path / "nope.npz")


def test_trigger():
    t, tm = make_square_trigger(32, 21, 10)
    check_trigger(t, tm, "trigger/x.npz")
    with np.load(ROOT / "trigger/trigger_pt_white_21_10_ap_replace.npz") as npz:
        check_trigger(npz["t"], npz["tm"], "shipped")
    cases = [
        (np.where(tm == 0, np.nan, t), tm, "trigger/x.npz: t holds NaN or infinite values"),
        (t, np.where(tm == 0, np.inf, tm), "trigger/x.npz: tm holds NaN or infinite values"),
        (np.where(tm == 0, 300.0, t), tm, "trigger/x.npz: t must lie in [0, 255], found values from 0 to 300"),
        (t - 1, tm, "trigger/x.npz: t must lie in [0, 255], found values from -1 to 254"),
        (t, np.where(tm == 0, 0.5, tm), "trigger/x.npz: tm must hold only 0 and 1 (1 keeps the pixel), found 0.5"),
        (t[:0], tm[:0], "trigger/x.npz holds no trigger (K = 0); regenerate it with python -m datasets.make_triggers"),
        (t, tm[..., :2], "trigger/x.npz: t and tm must have the same shape, got (1, 32, 32, 3) and (1, 32, 32, 2)"),
    ]
    for bad_t, bad_tm, message in cases:
        with pytest.raises(UserError) as err:
            check_trigger(bad_t, bad_tm, "trigger/x.npz")
        assert str(err.value) == message
