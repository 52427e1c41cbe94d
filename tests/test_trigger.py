"""Triggers are stamped exactly where the mask says; the default files are the published squares."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from datasets import load_trigger, make_square_trigger, stamp_trigger
from datasets.check_triggers import problems
from datasets.trigger import check_trigger
from paper import RELEASED_TRIGGERS
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


def test_shipped_triggers_are_the_released_files_and_stamp_as_before():
    """BadEncoder's released bytes (float64 t, int64 tm) load as the float32 squares the project's own
    files held, so every stamped image is the same bit for bit."""
    rng = np.random.default_rng(0)
    assert len(RELEASED_TRIGGERS) == 2 and problems(ROOT) == []
    for name, (size, start, side, md5) in RELEASED_TRIGGERS.items():
        assert hashlib.md5((ROOT / name).read_bytes()).hexdigest() == md5
        with np.load(ROOT / name) as npz:
            assert npz["t"].dtype == np.float64 and npz["tm"].dtype == np.int64
        t, tm = load_trigger(ROOT / name, (size, size))
        square_t, square_tm = make_square_trigger(size, start, side)
        assert t.dtype == tm.dtype == np.float32
        assert np.array_equal(t, square_t[0]) and np.array_equal(tm, square_tm[0])
        x = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        assert np.array_equal(stamp_trigger(x, t, tm), stamp_trigger(x, square_t[0], square_tm[0]))


def test_altered_or_missing_trigger_file_is_reported(tmp_path):
    (tmp_path / "trigger").mkdir()
    first, second = RELEASED_TRIGGERS
    shutil.copy(ROOT / first, tmp_path / first)
    with open(tmp_path / first, "ab") as fh:
        fh.write(b"\0")
    digest = hashlib.md5((tmp_path / first).read_bytes()).hexdigest()
    assert problems(tmp_path) == [f"{first}: md5 {digest}, the released file has {RELEASED_TRIGGERS[first][3]}",
                                  f"{second}: missing"]


def test_trigger_of_the_wrong_size_is_refused():
    with pytest.raises(UserError, match=r"trigger .* is 224x224 but the images are 32x32"):
        load_trigger(ROOT / "trigger/trigger_pt_white_173_50_ap_replace.npz", image_size=(32, 32))


def test_missing_trigger_says_how_to_restore_the_defaults(tmp_path):
    with pytest.raises(UserError) as err:
        load_trigger(tmp_path / "nope.npz")
    assert str(err.value) == (f"trigger file not found: {tmp_path / 'nope.npz'} (the defaults are BadEncoder's "
                              f"released files in trigger/: restore them with git checkout trigger/)")


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
        (t[:0], tm[:0], "trigger/x.npz holds no trigger (K = 0); a trigger file holds at least one pattern t and mask tm"),
        (t, tm[..., :2], "trigger/x.npz: t and tm must have the same shape, got (1, 32, 32, 3) and (1, 32, 32, 2)"),
    ]
    for bad_t, bad_tm, message in cases:
        with pytest.raises(UserError) as err:
            check_trigger(bad_t, bad_tm, "trigger/x.npz")
        assert str(err.value) == message
