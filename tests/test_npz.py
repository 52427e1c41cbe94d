"""Checks of dataset splits and reference files in the npz layout."""
from pathlib import Path

import numpy as np
import pytest

from datasets.npz import check_labels, check_reference_labels, check_split
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_labels():
    check_labels(np.array([0, 9, 3]), "d/train.npz")
    with pytest.raises(UserError, match=r"^d/train.npz: labels must be non-negative class indices, found -1$"):
        check_labels(np.array([0, -1]), "d/train.npz")
    with pytest.raises(UserError) as err:
        check_labels(np.array([0, 10 ** 12]), "d/train.npz")
    assert str(err.value) == ("d/train.npz: label 1000000000000 is not a class index (more than 100000 "
                              "classes); labels must be 0..C-1")
    with pytest.raises(UserError, match=r"labels must be integers, got float64"):
        check_labels(np.array([0.0, 1.0]), "d/train.npz")


def test_split():
    y = np.zeros(2, dtype=np.int64)
    check_split(np.zeros((2, 8, 8, 3), np.uint8), y, "d/train.npz")
    with pytest.raises(UserError, match=r"^d/train.npz holds no images; a split needs at least one$"):
        check_split(np.zeros((0, 32, 32, 3), np.uint8), y[:0], "d/train.npz")
    with pytest.raises(UserError) as err:
        check_split(np.zeros((2, 1, 1, 3), np.uint8), y, "d/train.npz")
    assert str(err.value) == ("d/train.npz: images are 1x1 pixels; the encoder needs at least 8x8 "
                              "(it downsamples them 8 times)")
    with pytest.raises(UserError, match=r"images are 32x4 pixels"):
        check_split(np.zeros((2, 32, 4, 3), np.uint8), y, "d/train.npz")
    with pytest.raises(UserError, match=r"found -1"):
        check_split(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1]), "d/train.npz")


def test_reference_labels():
    assert check_reference_labels(np.array([3, 3, 3]), "ref.npz") == 3
    with pytest.raises(UserError) as err:
        check_reference_labels(np.array([1, 2, 1]), "ref.npz")
    assert str(err.value) == ("reference file ref.npz holds labels 1 and 2; every reference input must "
                              "have the target label")
    with pytest.raises(UserError, match=r"holds labels 0, 1 and 2;"):
        check_reference_labels(np.array([2, 1, 0]), "ref.npz")
    with pytest.raises(UserError, match=r"^reference file ref.npz holds label -1; the target label must be"):
        check_reference_labels(np.array([-1, -1]), "ref.npz")
