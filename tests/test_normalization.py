"""Normalisation statistics: fixed published values, exact statistics of other datasets cached beside
their train split, and the statistics an encoder checkpoint carries."""
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import prepare_data
from datasets import (load_split, normalization, normalization_record, resolve_normalization,
                      save_split)
from datasets.channel_stats import compute_statistics
from datasets.npz import split_path
from datasets.prepare import prepare_image_folder, prepare_paper_dataset, write_normalization
from stage_cli import clean, error, evaluate
from utils.errors import UserError
from utils.files import load_checkpoint, save_checkpoint

stats = "datasets.channel_stats"
PUBLISHED = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "stl10": ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)),
    "demo_pretrain": ((0.4286, 0.4334, 0.4270), (0.2159, 0.2268, 0.2103)),
}


def write_train(data_dir, name, x):
    save_split(split_path(data_dir, name, "train"), x, np.zeros(len(x), dtype=np.int64))
    return split_path(data_dir, name, "train")


def numpy_stats(x):
    pixels = x.reshape(-1, 3).astype(np.float64) / 255
    return pixels.mean(0), pixels.std(0)  # population std, ddof=0


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- computed statistics

@pytest.mark.parametrize("n, h, w", [(1, 32, 32), (7, 40, 40), (300, 32, 32), (61, 13, 40)])
def test_statistics_equal_numpy(tmp_path, monkeypatch, n, h, w):
    # chunks of 5 images: several full chunks and a partial last one
    monkeypatch.setattr(f"{stats}.CHUNK_BYTES", 5 * h * w * 3)
    x = random_images(n, h, w, seed=n)
    write_train(tmp_path, "mine", x)
    mean, std = normalization("mine", tmp_path)
    want_mean, want_std = numpy_stats(x)
    assert type(mean) is tuple and type(std) is tuple and all(type(v) is float for v in mean + std)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=0, atol=1e-6)


def test_statistics_of_hand_made_images(tmp_path):
    x = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    x[:2, ..., 0] = 255  # R: half 1, half 0 -> mean 0.5, std 0.5
    x[..., 1] = [[0, 51], [102, 153]]  # G: 0, 0.2, 0.4, 0.6 -> mean 0.3, std sqrt(0.05)
    x[..., 2] = 255
    x[0, 0, 0, 2] = 0  # B: one 0 among 16 -> mean 15/16, std sqrt(15)/16
    write_train(tmp_path, "hand", x)
    mean, std = normalization("hand", tmp_path)
    assert mean == pytest.approx((0.5, 0.3, 15 / 16), abs=1e-15)
    assert std == pytest.approx((0.5, 0.05 ** 0.5, 15 ** 0.5 / 16), abs=1e-15)


def test_compressed_and_fortran_order_files_give_the_same_statistics(tmp_path):
    x = random_images(20, 40, 40, seed=3)
    want = numpy_stats(x)
    for name, save in (("zipped", np.savez_compressed), ("fortran", np.savez)):
        split_path(tmp_path, name, "train").parent.mkdir(parents=True)
        images = np.asfortranarray(x) if name == "fortran" else x
        save(split_path(tmp_path, name, "train"), x=images, y=np.zeros((20, 1), dtype=np.int64))
        mean, std = normalization(name, tmp_path)
        np.testing.assert_allclose(mean, want[0], atol=1e-6)
        np.testing.assert_allclose(std, want[1], atol=1e-6)


def test_cache_is_written_once_reused_and_refreshed(tmp_path, monkeypatch):
    path = write_train(tmp_path, "mine", random_images(30, 40, 40, seed=1))
    first = normalization("mine", tmp_path)
    cache = path.with_name("normalization.json")
    record = json.loads(cache.read_text())
    assert record == {"mean": list(first[0]), "std": list(first[1]), "source": "train.npz",
                      "images": 30, "train_npz_size": os.stat(path).st_size,
                      "train_npz_mtime": os.stat(path).st_mtime}

    def must_not_run(p):
        raise AssertionError("statistics recomputed although the cache is valid")
    monkeypatch.setattr(f"{stats}.compute_statistics", must_not_run)
    assert normalization("mine", tmp_path) == first

    # another train split (other size): recomputed and re-cached
    x = random_images(50, 40, 40, seed=2)
    write_train(tmp_path, "mine", x)
    with pytest.raises(AssertionError, match="recomputed"):
        normalization("mine", tmp_path)
    monkeypatch.setattr(f"{stats}.compute_statistics", compute_statistics)
    mean, std = normalization("mine", tmp_path)
    np.testing.assert_allclose(mean, numpy_stats(x)[0], atol=1e-6)
    assert json.loads(cache.read_text())["images"] == 50

    # same size, other pixels, another modification time: recomputed as well
    size = os.stat(path).st_size
    x = 255 - x
    write_train(tmp_path, "mine", x)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    assert os.stat(path).st_size == size
    mean, std = normalization("mine", tmp_path)
    np.testing.assert_allclose(mean, numpy_stats(x)[0], atol=1e-6)
    np.testing.assert_allclose(std, numpy_stats(x)[1], atol=1e-6)

    cache.write_text("{not json")  # a damaged cache is recomputed, not trusted
    assert normalization("mine", tmp_path) == (mean, std)
    assert json.loads(cache.read_text())["mean"] == list(mean)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_values_stay_even_with_data(tmp_path, name):
    write_train(tmp_path, name, random_images(5, 32, 32))
    assert normalization(name) == PUBLISHED[name]
    assert normalization(name, tmp_path) == PUBLISHED[name]
    assert not split_path(tmp_path, name, "train").with_name("normalization.json").exists()


# ---------------------------------------------------------------- bad input

def test_constant_channel_is_refused(tmp_path):
    x = random_images(6, 32, 32)
    x[..., 1] = 128
    path = write_train(tmp_path, "gray", x)
    with pytest.raises(UserError) as err:
        normalization("gray", tmp_path)
    assert str(err.value) == (f"{path}: channel G has standard deviation 0 (every pixel is the same); "
                              f"the encoder cannot normalise it — check the images")
    assert not path.with_name("normalization.json").exists()


def test_empty_missing_and_unknown_are_one_line_errors(tmp_path):
    path = write_train(tmp_path, "empty", np.zeros((0, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=f"^{path} holds no images; the normalisation statistics are "
                                        f"computed from the train split"):
        normalization("empty", tmp_path)
    with pytest.raises(UserError, match="^dataset file not found: .*absent/train.npz \\(create it"):
        normalization("absent", tmp_path)
    with pytest.raises(UserError) as err:
        normalization("mine")
    assert str(err.value).startswith("no normalisation statistics for 'mine'; known: cifar10, stl10, "
                                     "demo_pretrain (")
    assert "pass --data_dir, or create the dataset with python prepare_data.py" in str(err.value)
    broken = split_path(tmp_path, "broken", "train")
    broken.parent.mkdir()
    broken.write_bytes(b"PK not a zip")
    with pytest.raises(UserError, match=f"^cannot read {broken}"):
        normalization("broken", tmp_path)


# ---------------------------------------------------------------- encoder checkpoints

def test_checkpoint_statistics_win_and_conflicting_flags_are_refused(tmp_path):
    x = random_images(10, 32, 32)
    write_train(tmp_path, "mine", x)
    mean, std = normalization("mine", tmp_path)
    save_checkpoint(tmp_path / "enc.pth", {"state_dict": {"w": torch.zeros(1)}, "epoch": 1,
                                           "normalization": normalization_record("mine", mean, std)})
    ckpt = load_checkpoint(tmp_path / "enc.pth")  # the record survives a weights-only load
    assert ckpt["normalization"] == {"dataset": "mine", "mean": list(mean), "std": list(std)}

    # no flag: the encoder's own statistics, whatever the stage's default name is
    got = resolve_normalization(ckpt, "cifar10", tmp_path, flag_given=False)
    assert got == (mean, std, "the encoder checkpoint (trained on mine)")
    # the flag naming the same dataset with the same statistics is fine
    assert resolve_normalization(ckpt, "mine", tmp_path, flag_given=True)[:2] == (mean, std)
    # a flag naming another dataset is refused
    with pytest.raises(UserError) as err:
        resolve_normalization(ckpt, "cifar10", tmp_path, flag_given=True)
    fmt = ", ".join
    assert str(err.value) == (
        f"--pretraining_dataset cifar10 disagrees with the encoder's own normalisation (trained on "
        f"mine, mean ({fmt(f'{v:.6g}' for v in mean)}), std ({fmt(f'{v:.6g}' for v in std)})); "
        f"drop the flag or pass mine")
    with pytest.raises(UserError, match="^--encoder_usage_info stl10 disagrees"):
        resolve_normalization(ckpt, "stl10", None, True, flag="--encoder_usage_info")
    # the same name whose data now gives other statistics is refused too
    write_train(tmp_path, "mine", 255 - x[:, ::-1] // 2)
    with pytest.raises(UserError, match="disagrees .*normalization.json gives mean .*drop the flag"):
        resolve_normalization(ckpt, "mine", tmp_path, flag_given=True)
    # ... but without the data there is nothing to disagree with
    assert resolve_normalization(ckpt, "mine", tmp_path / "elsewhere", True)[:2] == (mean, std)


def test_checkpoint_without_statistics_uses_the_name(tmp_path):
    released = {"state_dict": {"w": torch.zeros(1)}, "epoch": 200, "optimizer": {}}
    for flag_given in (False, True):
        mean, std, source = resolve_normalization(released, "cifar10", tmp_path, flag_given)
        assert (mean, std) == PUBLISHED["cifar10"] and "cifar10" in source
    write_train(tmp_path, "mine", random_images(4, 32, 32))
    mean, std, source = resolve_normalization(released, "mine", tmp_path, False)
    assert (mean, std) == normalization("mine", tmp_path)
    assert source == str(split_path(tmp_path, "mine", "train").with_name("normalization.json"))
    with pytest.raises(UserError, match="normalization entry is malformed"):
        resolve_normalization({"normalization": {"dataset": "x", "mean": [0.5], "std": [1, 1, 1]}},
                              "x", None, False)


# ---------------------------------------------------------------- prepare_data writes the file

def write_folder(folder, constant_blue=False):
    rng = np.random.default_rng(7)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if constant_blue:
                pixels[..., 2] = 0
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")


def test_image_folder_gets_normalization_json(tmp_path, capsys, monkeypatch):
    write_folder(tmp_path / "imgs")
    argv = ["--image_folder", str(tmp_path / "imgs"), "--name", "mine", "--test_fraction", "0.34",
            "--out", str(tmp_path / "data")]
    assert prepare_data.main(prepare_data.get_parser().parse_args(argv)) == 0
    cache = tmp_path / "data" / "mine" / "normalization.json"
    record = json.loads(cache.read_text())
    x, _ = load_split(tmp_path / "data", "mine", "train")
    assert record["images"] == len(x) == 4
    np.testing.assert_allclose(record["mean"], numpy_stats(x)[0], atol=1e-6)
    np.testing.assert_allclose(record["std"], numpy_stats(x)[1], atol=1e-6)
    assert f"mine normalisation: mean ({record['mean'][0]:.4f}, " in capsys.readouterr().out

    monkeypatch.setattr(f"{stats}.compute_statistics", lambda p: pytest.fail("recomputed"))
    rows = prepare_image_folder(tmp_path / "imgs", "mine", tmp_path / "data")  # all kept
    assert [r["status"] for r in rows] == ["kept", "kept"] and "normalization" in rows[0]


def test_image_folder_with_a_constant_channel_still_prepares(tmp_path, capsys):
    write_folder(tmp_path / "imgs", constant_blue=True)
    rows = prepare_image_folder(tmp_path / "imgs", "dark", tmp_path / "data", test_fraction=0.34)
    assert [r["status"] for r in rows] == ["written", "written"]
    assert "channel B has standard deviation 0" in capsys.readouterr().err
    assert not (tmp_path / "data" / "dark" / "normalization.json").exists()


def test_paper_datasets_get_the_file_except_cifar10_and_stl10(tmp_path, monkeypatch):
    import torchvision.datasets.svhn
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda f, md5=None: os.path.isfile(f))
    x = random_images(5, 32, 32, seed=9)
    for split in ("train", "test"):
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": x.transpose(1, 2, 3, 0), "y": np.arange(1, 6, dtype=np.uint8)[:, None]})
    rows = prepare_paper_dataset("svhn", tmp_path, tmp_path / "data")
    record = json.loads((tmp_path / "data" / "svhn" / "normalization.json").read_text())
    np.testing.assert_allclose(record["mean"], numpy_stats(x)[0], atol=1e-6)
    assert rows[0]["normalization"].startswith("mean (") and "normalization" not in rows[1]
    write_train(tmp_path / "data", "cifar10", x)
    assert write_normalization(tmp_path / "data", "cifar10") == {}
    assert not (tmp_path / "data" / "cifar10" / "normalization.json").exists()


@pytest.mark.parametrize("entry, message", [
    ("cifar10", "normalization entry is a str ('cifar10'), not {'dataset': name, 'mean': [3 floats], 'std': "
                "[3 positive floats]}; the file is damaged or was not written by this project"),
    ({"dataset": "cifar10", "mean": [0.5] * 3, "std": [0.2, -0.1, 0.2]},
     "normalization entry has std (0.2, -0.1, 0.2); a standard deviation must be positive, so the file is damaged"),
    ({"dataset": "cifar10", "mean": [0.5] * 3, "std": [0.2, 0, 0.2]},
     "normalization entry has std (0.2, 0, 0.2); a standard deviation must be positive, so the file is damaged"),
], ids=["string", "negative-std", "zero-std"])
def test_a_damaged_normalization_entry_names_the_checkpoint(tiny, tmp_path, entry, message, capsys):
    """Issue 37, item 6: the string was an AttributeError traceback; a negative std was scored."""
    assert clean(tiny, tmp_path / "clean", epochs=1) == 0
    path = tmp_path / "encoder.pth"
    ckpt = torch.load(tmp_path / "clean" / "model_1.pth", weights_only=True)
    save_checkpoint(path, {**ckpt, "normalization": entry})
    capsys.readouterr()
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    assert error(capsys) == f"error: the encoder checkpoint {path}: {message}"
