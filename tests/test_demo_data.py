"""The synthetic demo data: reproducible, balanced, class carried by shape rather than colour,
no trigger-like white corner, and a reference file holding a prototype or target-class training images."""
import numpy as np
import pytest

from datasets.demo import (DOWNSTREAM_CLASSES, DOWNSTREAM_NAME, MAX_VALUE, PRETRAIN_CLASSES, PROTOTYPE,
                           PRETRAIN_NAME, build_parser, main, make_demo_data, make_split,
                           prototype_reference)
from datasets.npz import load_reference, load_split
from utils.errors import UserError

N = 1000  # images per split in these tests: 100 per class
PER_CLASS = N // 10
SIZES = dict(n_pretrain_train=300, n_pretrain_test=100, n_down_train=200, n_down_test=100)


@pytest.fixture(scope="module")
def pretrain():
    return make_split(PRETRAIN_NAME, "train", N, seed=0)


@pytest.fixture(scope="module")
def downstream():
    return make_split(DOWNSTREAM_NAME, "train", N, seed=0)


def test_same_seed_same_images_other_seed_other_images(downstream):
    x, y = downstream
    x2, y2 = make_split(DOWNSTREAM_NAME, "train", N, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = make_split(DOWNSTREAM_NAME, "train", N, seed=1)
    assert np.mean(x != x3) > 0.9
    x4, _ = make_split(DOWNSTREAM_NAME, "test", N, seed=0)  # splits draw from separate streams
    assert np.mean(x != x4) > 0.9


@pytest.mark.parametrize("which, classes", [("pretrain", PRETRAIN_CLASSES),
                                            ("downstream", DOWNSTREAM_CLASSES)])
def test_shapes_dtypes_labels_and_balance(which, classes, request):
    x, y = request.getfixturevalue(which)
    assert x.shape == (N, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (N,) and np.issubdtype(y.dtype, np.integer)
    counts = np.bincount(y, minlength=len(classes))
    assert len(counts) == len(classes) == 10
    assert counts.max() - counts.min() <= 1
    assert len(set(y[:20].tolist())) > 5  # shuffled, not sorted by class


@pytest.mark.parametrize("which", ["pretrain", "downstream"])
def test_mean_colour_does_not_identify_the_class(which, request):
    x, y = request.getfixturevalue(which)
    colour = x.reshape(len(x), -1, 3).mean(axis=1)  # N x 3 mean RGB per image
    class_means = np.stack([colour[y == c].mean(axis=0) for c in range(10)])
    within_std = np.mean([colour[y == c].std(axis=0) for c in range(10)], axis=0)
    # by chance a class mean strays about within_std / sqrt(PER_CLASS) = 0.1 std; allow 4 times that
    assert (np.abs(class_means - colour.mean(axis=0)) < 4 * within_std / np.sqrt(PER_CLASS)).all()
    # and a nearest-class-mean rule on the mean colour stays near chance (10%)
    predicted = np.argmin(((colour[:, None, :] - class_means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == y) < 0.2


@pytest.mark.parametrize("which", ["pretrain", "downstream"])
def test_images_vary_and_raw_pixels_do_not_separate_classes(which, request):
    x, y = request.getfixturevalue(which)
    flat = x.reshape(len(x), -1).astype(np.float64)
    train, test = slice(0, N // 2), slice(N // 2, N)
    means = np.stack([flat[train][y[train] == c].mean(axis=0) for c in range(10)])
    predicted = np.argmin(((flat[test][:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == y[test]) < 0.3  # no fixed template per class
    assert x.std(axis=0).mean() > 30  # pixels vary a lot across images


@pytest.mark.parametrize("which", ["pretrain", "downstream"])
def test_trigger_corner_is_never_white_and_not_class_specific(which, request):
    x, y = request.getfixturevalue(which)
    assert x.max() <= MAX_VALUE < 255  # no demo pixel can equal the trigger's 255
    corner = x[:, 21:31, 21:31].mean(axis=(1, 2, 3))  # mean grey level where the 10x10 trigger goes
    assert np.mean(corner > 200) < 0.01
    per_class = np.array([corner[y == c].mean() for c in range(10)])
    within_std = np.mean([corner[y == c].std() for c in range(10)])
    assert (np.abs(per_class - corner.mean()) < 4 * within_std / np.sqrt(PER_CLASS)).all()


def test_make_demo_data_writes_splits_and_reference(tmp_path):
    paths = make_demo_data(tmp_path / "data", tmp_path / "reference", **SIZES,
                           target_class=7, n_reference=4, seed=3)
    for name, split, n in ((PRETRAIN_NAME, "train", 300), (PRETRAIN_NAME, "test", 100),
                           (DOWNSTREAM_NAME, "train", 200), (DOWNSTREAM_NAME, "test", 100)):
        x, y = load_split(tmp_path / "data", name, split)
        expected_x, expected_y = make_split(name, split, n, seed=3)
        assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
        with np.load(paths[f"{name}/{split}"]) as npz:
            assert npz["y"].shape == (n, 1)  # the BadEncoder release layout

    assert paths["reference"] == tmp_path / "reference" / "demo" / f"{DOWNSTREAM_CLASSES[7]}.npz"
    with np.load(paths["reference"]) as npz:
        ref_x, ref_y = npz["x"], npz["y"]
    assert ref_x.shape == (4, 32, 32, 3) and ref_x.dtype == np.uint8
    assert ref_y.shape == (4,) and (ref_y == 7).all()
    assert load_reference(paths["reference"])[1] == 7
    x, y = load_split(tmp_path / "data", DOWNSTREAM_NAME, "train")
    assert np.array_equal(ref_x, x[y == 7][:4])  # the first four target-class training images


def test_existing_files_are_kept_unless_settings_change(tmp_path):
    args = dict(data_dir=tmp_path / "data", reference_dir=tmp_path / "ref", **SIZES,
                target_class=2, n_reference=3, seed=0)
    paths = make_demo_data(**args)
    first = {k: p.read_bytes() for k, p in paths.items()}
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = make_demo_data(**args)
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps  # nothing rewritten

    forced = make_demo_data(**args, force=True)
    assert {k: p.read_bytes() for k, p in forced.items()} == first  # same seed, same bytes

    reseeded = make_demo_data(**{**args, "seed": 1})
    x, _ = load_split(tmp_path / "data", PRETRAIN_NAME, "train")
    assert np.array_equal(x, make_split(PRETRAIN_NAME, "train", 300, seed=1)[0])
    assert reseeded["reference"].read_bytes() != first["reference"]


def test_bad_requests_fail_with_a_message(tmp_path):
    args = dict(data_dir=tmp_path / "data", reference_dir=tmp_path / "ref", **SIZES,
                target_class=0, n_reference=3, seed=0)
    with pytest.raises(UserError, match="not a downstream class"):
        make_demo_data(**{**args, "target_class": 10})
    with pytest.raises(UserError, match="at least 10"):
        make_demo_data(**{**args, "n_down_test": 5})
    with pytest.raises(UserError, match="fewer than"):
        make_demo_data(**{**args, "n_reference": 50})


def test_command_line(tmp_path, capsys):
    args = build_parser().parse_args([
        "--data_dir", str(tmp_path / "data"), "--reference_dir", str(tmp_path / "ref"),
        "--n_pretrain_train", "20", "--n_pretrain_test", "10", "--n_down_train", "30",
        "--n_down_test", "10", "--target_class", "1", "--n_reference", "2", "--seed", "5"])
    main(args)
    assert (tmp_path / "ref" / "demo" / f"{DOWNSTREAM_CLASSES[1]}.npz").is_file()
    assert len(load_split(tmp_path / "data", DOWNSTREAM_NAME, "train")[0]) == 30
    assert "reference" in capsys.readouterr().out


def test_default_reference_is_one_prototype_of_the_target_class(tmp_path):
    paths = make_demo_data(tmp_path / "data", tmp_path / "reference", **SIZES,
                           target_class=1, n_reference=0, seed=3)
    with np.load(paths["reference"]) as npz:
        x, y = npz["x"], npz["y"]
    assert paths["reference"].name == "hexagon.npz"
    assert x.shape == (1, 32, 32, 3) and y.tolist() == [1]         # one image, as the released files
    image = x[0].astype(int)
    background, colour = np.array(PROTOTYPE["background"]), np.array(PROTOTYPE["object"])
    assert (image[0, 0] == background).all() and (image[16, 16] == colour).all()   # plain, centred
    # no noise: every pixel is a blend of the two colours (anti-aliased edges only)
    t = ((image - background) @ (colour - background)) / ((colour - background) @ (colour - background))
    blend = background + t[..., None] * (colour - background)
    assert np.abs(image - blend).max() <= 1
    inside = t > 0.5
    assert 0.3 < inside.mean() < 0.6                                  # a large shape, scale 12 of 32
    rows, cols = np.nonzero(inside)
    assert abs(rows.mean() - 15.5) < 0.5 and abs(cols.mean() - 15.5) < 0.5
    assert np.array_equal(x, prototype_reference(1, seed=3))
