"""prepare_data.py: tiny files in each dataset's real on-disk format, converted pixel for pixel."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

import prepare_data
from datasets.npz import load_reference, load_split, save_split, split_path
from datasets.prepare import (EXPECTED_SIZES, make_reference, prepare_image_folder, prepare_paper_dataset,
                              reference_path, size_warnings)
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_md5(monkeypatch):
    """The tiny files written here are in the real formats but not the real bytes: torchvision's md5
    check of CIFAR-10, SVHN and STL-10 is replaced by a check that the file exists."""
    import torchvision.datasets.cifar
    import torchvision.datasets.stl10
    import torchvision.datasets.svhn
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def noise(rng, *shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def bicubic_32(image):
    """What the documented filter makes of a source image: Pillow BICUBIC to 32x32."""
    return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------- sources in the real formats

def write_cifar10(root, per_batch=3, n_test=4, seed=0):
    """cifar-10-batches-py: pickled dicts, data uint8 (N, 3072) channel-planar (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in names:
            n = per_batch if split == "train" else n_test
            data, labels = noise(rng, n, 3072), rng.integers(0, 10, n).tolist()
            # The real files are Python 2 pickles whose keys torchvision reads (encoding="latin1")
            # as str; Python 3 str keys unpickle the same way.
            with open(folder / name, "wb") as fh:
                pickle.dump({"batch_label": name, "labels": labels, "data": data,
                             "filenames": [f"{name}_{i}.png" for i in range(n)]}, fh, protocol=2)
            xs.append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
            ys += labels
        expected[split] = (np.concatenate(xs), np.array(ys))
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, fh, protocol=2)
    return expected


def write_svhn(root, seed=1):
    """{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 standing for digit 0."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, n in (("train", 7), ("test", 5)):
        x = noise(rng, n, 32, 32, 3)
        digits = np.array([0, 1, 2, 10, 1, 9, 10][:n], dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": digits[:, None]})
        expected[split] = (x, np.where(digits == 10, 0, digits))
    return expected


def write_gtsrb(root, seed=2):
    """The layout torchvision's GTSRB reads: Training/<class>/*.ppm, Final_Test/Images + CSV."""
    rng = np.random.default_rng(seed)
    base = root / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    sizes = [(37, 40), (16, 15), (52, 61), (32, 32)]  # (height, width): shrink, enlarge, as is
    train_x, train_y = [], []
    for k, label in enumerate((0, 12, 42)):  # a subset of the 43 class folders
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for j in range(2):
            h, w = sizes[(k + j) % len(sizes)]
            name = f"00000_{j:05d}.ppm"
            Image.fromarray(noise(rng, h, w, 3)).save(folder / name)
            rows.append(f"{name};{w};{h};1;1;{w - 2};{h - 2};{label}\n")
            train_x.append(bicubic_32(Image.open(folder / name)))
            train_y.append(label)
        (folder / f"GT-{label:05d}.csv").write_text(header + "".join(rows))
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    test_x, rows = [], []
    test_y = [5, 12, 0, 42]
    for i, label in enumerate(test_y):
        h, w = sizes[i]
        name = f"{3 - i:05d}.ppm"  # CSV order differs from file-name order: the CSV rules
        Image.fromarray(noise(rng, h, w, 3)).save(images / name)
        rows.append(f"{name};{w};{h};0;0;{w - 1};{h - 1};{label}\n")
        test_x.append(bicubic_32(Image.open(images / name)))
    (base / "GT-final_test.csv").write_text(header + "".join(rows))
    return {"train": (np.stack(train_x), np.array(train_y)), "test": (np.stack(test_x), np.array(test_y))}


def write_stl10(root, seed=3):
    """stl10_binary/*.bin: uint8 images stored (N, 3, 96, 96) column-major, labels 1-based."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    originals = {}
    for split, n, file in (("train", 3, "train"), ("test", 2, "test"), ("train_unlabeled", 4, "unlabeled")):
        x = noise(rng, n, 96, 96, 3)  # NxHxWxC
        x.transpose(0, 3, 2, 1).tofile(folder / f"{file}_X.bin")  # NxCxWxH on disk
        y = np.full(n, -1) if file == "unlabeled" else rng.integers(0, 10, n)
        if file != "unlabeled":
            (y + 1).astype(np.uint8).tofile(folder / f"{file}_y.bin")
        originals[split] = (x, y)
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer",
                                                       "dog", "horse", "monkey", "ship", "truck"]))
    return originals


# ---------------------------------------------------------------- the four datasets

def test_cifar10_is_copied_pixel_for_pixel(tmp_path, no_md5):
    expected = write_cifar10(tmp_path / "raw")
    rows = prepare_paper_dataset("cifar10", tmp_path / "raw", tmp_path / "data")
    for split, (x, y) in expected.items():
        got_x, got_y = load_split(tmp_path / "data", "cifar10", split)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
        with np.load(split_path(tmp_path / "data", "cifar10", split)) as npz:
            assert npz["x"].shape == (len(x), 32, 32, 3) and npz["x"].dtype == np.uint8
            assert npz["y"].shape == (len(x), 1)
    assert [(r["split"], r["images"], r["expected"], r["status"]) for r in rows] == [
        ("train", 15, 50_000, "written"), ("test", 4, 10_000, "written")]
    assert size_warnings(rows)[0] == ("cifar10 train holds 15 images, the official release 50,000 "
                                      "(fine for a subset)")


def test_checksums_are_verified(tmp_path):
    write_cifar10(tmp_path / "raw")
    with pytest.raises(UserError) as err:
        prepare_paper_dataset("cifar10", tmp_path / "raw", tmp_path / "data")
    message = str(err.value)
    assert "cannot read CIFAR-10 from" in message and "md5" in message and "\n" not in message
    assert not (tmp_path / "data" / "cifar10" / "train.npz").exists()


def test_svhn_label_10_becomes_digit_0(tmp_path, no_md5):
    expected = write_svhn(tmp_path / "raw")
    prepare_paper_dataset("svhn", tmp_path / "raw", tmp_path / "data")
    for split, (x, y) in expected.items():
        got_x, got_y = load_split(tmp_path / "data", "svhn", split)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    assert load_split(tmp_path / "data", "svhn", "train")[1].tolist() == [0, 1, 2, 0, 1, 9, 0]


def test_gtsrb_is_resized_with_bicubic_and_keeps_class_ids(tmp_path, no_md5):
    expected = write_gtsrb(tmp_path / "raw")
    prepare_paper_dataset("gtsrb", tmp_path / "raw", tmp_path / "data")  # GTSRB has no checksums
    for split, (x, y) in expected.items():
        got_x, got_y = load_split(tmp_path / "data", "gtsrb", split)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    # class ids are the folder numbers, even though only 3 of the 43 folders exist
    assert load_split(tmp_path / "data", "gtsrb", "train")[1].tolist() == [0, 0, 12, 12, 42, 42]


def test_stl10_is_resized_and_unlabeled_keeps_minus_one(tmp_path, no_md5):
    originals = write_stl10(tmp_path / "raw")
    rows = prepare_paper_dataset("stl10", tmp_path / "raw", tmp_path / "data")
    assert [r["split"] for r in rows] == ["train", "test", "train_unlabeled"]
    for split, (x96, y) in originals.items():
        got_x, got_y = load_split(tmp_path / "data", "stl10", split)
        np.testing.assert_array_equal(got_x, np.stack([bicubic_32(Image.fromarray(im)) for im in x96]))
        np.testing.assert_array_equal(got_y, y)
    assert set(load_split(tmp_path / "data", "stl10", "train_unlabeled")[1].tolist()) == {-1}


def test_box_filter_averages_3x3_blocks_of_stl10(tmp_path, no_md5):
    originals = write_stl10(tmp_path / "raw")
    prepare_paper_dataset("stl10", tmp_path / "raw", tmp_path / "data",
                          resize_filter="box")
    x96 = originals["test"][0].astype(np.float64)
    block_mean = x96.reshape(-1, 32, 3, 32, 3, 3).mean(axis=(2, 4))
    got = load_split(tmp_path / "data", "stl10", "test")[0].astype(np.float64)
    assert np.abs(got - block_mean).max() <= 1  # Pillow's fixed-point arithmetic: within a level
    assert np.abs(got - np.rint(block_mean)).mean() < 0.1


# ---------------------------------------------------------------- finished work, errors

def test_second_run_keeps_files_and_force_rebuilds(tmp_path, no_md5):
    write_svhn(tmp_path / "raw")
    raw, data = tmp_path / "raw", tmp_path / "data"
    prepare_paper_dataset("svhn", raw, data)
    train, test = split_path(data, "svhn", "train"), split_path(data, "svhn", "test")
    inode = os.stat(train).st_ino
    (raw / "train_32x32.mat").rename(raw / "moved.mat")  # a kept split must not need its source
    rows = prepare_paper_dataset("svhn", raw, data)
    assert [r["status"] for r in rows] == ["kept", "kept"] and os.stat(train).st_ino == inode
    with pytest.raises(UserError, match="train_32x32.mat"):
        prepare_paper_dataset("svhn", raw, data, force=True)
    (raw / "moved.mat").rename(raw / "train_32x32.mat")
    rows = prepare_paper_dataset("svhn", raw, data, force=True)
    assert [r["status"] for r in rows] == ["written", "written"] and os.stat(train).st_ino != inode
    test.write_bytes(b"not an npz")  # a corrupt split is rebuilt, the valid one kept
    rows = prepare_paper_dataset("svhn", raw, data)
    assert [r["status"] for r in rows] == ["kept", "written"]
    assert len(load_split(data, "svhn", "test")[0]) == 5


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py/{data_batch_1, data_batch_2", "batches.meta}"]),
    ("svhn", ["train_32x32.mat"]),
    ("gtsrb", ["gtsrb/GTSRB/Training", "GTSRB-Training_fixed.zip"]),
    ("stl10", ["stl10_binary/{train_X.bin, train_y.bin", "unlabeled_X.bin}"]),
])
def test_missing_source_names_the_expected_files(tmp_path, name, expected, no_md5):
    with pytest.raises(UserError) as err:
        prepare_paper_dataset(name, tmp_path / "raw", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and "source not found: expected " + str(tmp_path / "raw") in message
    for text in expected:
        assert text in message


def test_corrupt_source_is_a_one_line_error(tmp_path, no_md5):
    write_cifar10(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q")
    with pytest.raises(UserError) as err:
        prepare_paper_dataset("cifar10", tmp_path / "raw", tmp_path / "data")
    assert str(err.value).startswith("cannot read CIFAR-10 from " + str(tmp_path / "raw"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- image folders

def write_image_folder(folder, seed=4):
    """Three classes of PNG (RGB, grey, RGBA) and JPEG images of mixed sizes, plus a stray file."""
    rng = np.random.default_rng(seed)
    expected = {}
    kinds = [("png", "RGB", (40, 30)), ("png", "L", (20, 20)), ("png", "RGBA", (50, 64)),
             ("jpg", "RGB", (33, 47)), ("jpeg", "RGB", (32, 32))]
    for label, cls in enumerate(["bird", "cat", "dog"]):  # labels follow sorted names
        (folder / cls).mkdir(parents=True)
        for i, (ext, mode, (h, w)) in enumerate(kinds[(label + k) % len(kinds)] for k in range(4)):
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            pixels = noise(rng, h, w, channels)
            path = folder / cls / f"img{i}.{ext}"
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
            expected[bicubic_32(Image.open(path)).tobytes()] = label
    (folder / "cat" / "notes.txt").write_text("not an image")
    return expected


def test_image_folder_split_by_fraction(tmp_path):
    expected = write_image_folder(tmp_path / "imgs")
    rows = prepare_image_folder(tmp_path / "imgs", "mine", tmp_path / "data", test_fraction=0.25, seed=1)
    seen = []
    for split in ("train", "test"):
        x, y = load_split(tmp_path / "data", "mine", split)
        for image, label in zip(x, y):
            assert expected[image.tobytes()] == label  # each image converted and labelled right
            seen.append(image.tobytes())
        if split == "test":
            assert sorted(y.tolist()) == [0, 1, 2]  # round(0.25 * 4) = 1 image of each class
    assert sorted(seen) == sorted(expected)  # every image once, in one split
    assert [r["images"] for r in rows] == [9, 3] and rows[0]["expected"] is None
    assert (tmp_path / "data" / "mine" / "classes.txt").read_text() == "bird\ncat\ndog\n"
    first = load_split(tmp_path / "data", "mine", "train")
    prepare_image_folder(tmp_path / "imgs", "mine", tmp_path / "data", 0.25, seed=1, force=True)
    again = load_split(tmp_path / "data", "mine", "train")
    np.testing.assert_array_equal(first[0], again[0])  # the split and order are deterministic
    (tmp_path / "imgs").rename(tmp_path / "gone")  # finished splits need no source
    rows = prepare_image_folder(tmp_path / "imgs", "mine", tmp_path / "data", 0.25, seed=1)
    assert [(r["status"], r["images"]) for r in rows] == [("kept", 9), ("kept", 3)]


def test_image_folder_with_train_and_test_folders(tmp_path):
    expected = write_image_folder(tmp_path / "imgs" / "train")
    test_img = np.full((10, 70, 3), 200, dtype=np.uint8)
    (tmp_path / "imgs" / "test" / "dog").mkdir(parents=True)
    Image.fromarray(test_img).save(tmp_path / "imgs" / "test" / "dog" / "a.bmp")
    prepare_image_folder(tmp_path / "imgs", "split", tmp_path / "data")
    x, y = load_split(tmp_path / "data", "split", "train")
    assert sorted(img.tobytes() for img in x) == sorted(expected)
    x, y = load_split(tmp_path / "data", "split", "test")
    np.testing.assert_array_equal(x[0], bicubic_32(Image.fromarray(test_img)))
    assert y.tolist() == [2]  # dog is the third of the sorted training classes
    (tmp_path / "imgs" / "test" / "fish").mkdir()
    with pytest.raises(UserError, match="class 'fish' is not among the training classes"):
        prepare_image_folder(tmp_path / "imgs", "split", tmp_path / "data", force=True)
    with pytest.raises(UserError, match="drop --test_fraction"):
        prepare_image_folder(tmp_path / "imgs", "split", tmp_path / "data", test_fraction=0.1,
                             force=True)


def test_unreadable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        prepare_image_folder(tmp_path / "imgs", "mine", tmp_path / "data", test_fraction=0.5)


# ---------------------------------------------------------------- reference files

def write_labelled_split(data_dir, name, labels, seed=5):
    x = noise(np.random.default_rng(seed), len(labels), 32, 32, 3)
    save_split(split_path(data_dir, name, "train"), x, np.array(labels))
    return x


def test_reference_pick_first_takes_the_first_images_of_the_target_class(tmp_path):
    data, ref = tmp_path / "data", tmp_path / "reference"
    sources = {"gtsrb": [12, 3, 12, 12, 40, 12], "stl10": [9, 9, 0, 9, 1], "svhn": [1, 0, 1, 1, 1]}
    images = {name: write_labelled_split(data, name, labels) for name, labels in sources.items()}
    made = [("cifar10", "priority", "gtsrb", 12), ("cifar10", "truck", "stl10", 9), ("cifar10", "one", "svhn", 1)]

    def make(count, force=False):
        return [make_reference(data, dataset, label, reference_path(ref, usage, name), count, force, pick="first")
                for usage, name, dataset, label in made]
    rows = make(3)
    assert [(r["file"], r["images"], r["status"]) for r in rows] == [
        (str(ref / "cifar10" / f"{n}.npz"), 3, "written") for _, n, _, _ in made]
    for usage, name, dataset, label in made:
        x, target = load_reference(reference_path(ref, usage, name))
        index = [i for i, c in enumerate(sources[dataset]) if c == label][:3]
        np.testing.assert_array_equal(x, images[dataset][index])
        assert target == label
        with np.load(reference_path(ref, usage, name)) as npz:
            assert npz["x"].dtype == np.uint8 and npz["y"].tolist() == [label] * 3
    assert [r["status"] for r in make(2)] == ["kept"] * 3
    assert [r["images"] for r in make(2, force=True)] == [2, 2, 2]
    with pytest.raises(UserError, match="holds 3 images of class 9, fewer than the 4"):
        make_reference(data, "stl10", 9, ref / "x.npz", count=4)
    with pytest.raises(UserError, match="prepare_data.py --dataset cifar10"):
        make_reference(data, "cifar10", 9, ref / "x.npz")


# ---------------------------------------------------------------- command line

def test_cli_prepares_and_prints_the_summary(tmp_path, capsys):
    write_gtsrb(tmp_path / "raw")
    argv = ["--dataset", "gtsrb", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "data"),
            "--make_reference", "gtsrb", "42", "end", "--reference_count", "2",
            "--reference_dir", str(tmp_path / "ref")]
    assert prepare_data.main(prepare_data.get_parser().parse_args(argv)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["dataset", "split", "images", "expected", "shape", "dtype", "labels",
                                "status"]
    assert lines[1].split()[:4] == ["gtsrb", "train", "6", f"{EXPECTED_SIZES['gtsrb']['train']:,}"]
    assert lines[1].endswith("written") and "0..42 (3 values)" in lines[1]
    assert "gtsrb train holds 6 images, the official release 39,209" in err
    assert load_reference(tmp_path / "ref" / "cifar10" / "end.npz")[1] == 42
    prepare_data.main(prepare_data.get_parser().parse_args(argv))
    assert capsys.readouterr().out.splitlines()[1].endswith("kept")


def test_every_help_states_its_default():
    for action in prepare_data.get_parser()._actions:
        if action.dest != "help":
            assert "(default:" in action.help, action.dest


def test_cli_missing_source_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "prepare_data.py", "--dataset", "svhn", "--root", str(tmp_path / "nothing"),
         "--out", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == (f"error: SVHN source not found: expected {tmp_path / 'nothing'}/"
                             f"train_32x32.mat (put the cropped-digits file there, or pass --download)\n")
    assert result.stdout == ""
