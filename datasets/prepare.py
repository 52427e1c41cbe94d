"""Convert the paper's datasets, or any folder of class images, to the npz layout the stages read.

Every split becomes `<data_dir>/<name>/<split>.npz` holding x uint8 (N, 32, 32, 3) RGB and y int64
(N, 1). The four datasets of the paper are read with torchvision's dataset classes from the folder
they download to (`root`), laid out as torchvision expects:

    cifar10  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    svhn     root/{train,test}_32x32.mat                (digit 0, stored as 10 there, becomes label 0)
    gtsrb    root/gtsrb/GTSRB/Training/<00000..00042>/*.ppm,
             root/gtsrb/GTSRB/Final_Test/Images/*.ppm and root/gtsrb/GT-final_test.csv
    stl10    root/stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin

STL-10's unlabeled split is written as `train_unlabeled.npz` with torchvision's label -1 for every
image. Reading it loads the 2.6 GB unlabeled_X.bin at once (about 3 GB of memory).

Resizing: CIFAR-10 and SVHN are 32x32 already and are copied pixel for pixel. GTSRB (15x15 to
250x250 pixels) and STL-10 (96x96) are resized to 32x32 with Pillow's BICUBIC filter by default.
When Pillow shrinks an image it widens the bicubic kernel by the reduction factor, so every source
pixel contributes (no aliasing, unlike sampling), while edges stay sharper than with BOX or
BILINEAR averaging; GTSRB also holds signs smaller than 32 pixels, which BICUBIC enlarges smoothly
where BOX would give blocks. The whole image is resized (GTSRB's ROI columns are not used).

Labels: as torchvision gives them, except that a GTSRB training image takes the number of its class
folder (identical to torchvision's index when all 43 folders are present, and still right for a
subset of folders). Image order is the source order; GTSRB's training split is therefore sorted by
class.

Normalisation: next to every train split except CIFAR-10's and STL-10's (whose published statistics
are fixed) goes normalization.json, the exact per-channel mean and std of its pixels scaled to [0, 1]
(datasets/channel_stats.py), which the stages read when an encoder is trained on that dataset.

Checksums: torchvision verifies the md5 of the CIFAR-10, SVHN and STL-10 files and refuses altered
ones. (The tests, which build tiny files in the real formats, switch that check off with pytest's
monkeypatch.)
"""
import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import find_classes
from tqdm import tqdm

from paper import RELEASED_REFERENCES, TASKS
from utils.errors import UserError
from utils.files import atomic_write

from .channel_stats import CACHE_NAME, NORMALIZATION, normalization
from .npz import check_dataset_name, read_images_npz, save_reference, save_split, split_path

IMAGE_SIZE = 32
RESIZE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_RESIZE_FILTER = "bicubic"
UNLABELED = -1  # torchvision's label for STL-10's unlabeled images, kept as is

# Full sizes of the official releases; a smaller count is reported as a warning (users may prepare
# subsets), never as an error.
EXPECTED_SIZES = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "svhn": {"train": 73_257, "test": 26_032},
    "gtsrb": {"train": 39_209, "test": 12_630},
    "stl10": {"train": 5_000, "test": 8_000, "train_unlabeled": 100_000},
}
NUM_CLASSES = {"cifar10": 10, "svhn": 10, "gtsrb": 43, "stl10": 10}
PAPER_DATASETS = tuple(EXPECTED_SIZES)

# The authors' released reference files of the paper's tasks (paper.TASKS), shipped in reference/:
# (encoder usage, file name, source dataset, class), e.g. ("cifar10", "priority", "gtsrb", 12).
PAPER_REFERENCES = tuple((t.pretraining, Path(t.reference).stem, t.dataset, t.label)
                         for tasks in TASKS.values() for t in tasks)
DEFAULT_REFERENCE_COUNT = 1          # the released files hold one image each

# --make_reference's pick among the images of the class (see pick_reference).
REFERENCE_PICKS = ("medoid", "first")
DEFAULT_REFERENCE_PICK = "medoid"
MEDOID_POOL = 500                    # candidates: the first this many images of the class
MEDOID_SIZE = 8                      # compared as 8x8 grayscale thumbnails

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff",
                    ".webp", ".gif")
DEFAULT_TEST_FRACTION = 0.2

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]


# ---------------------------------------------------------------- images

def resize_image(image, size=IMAGE_SIZE, resize_filter=DEFAULT_RESIZE_FILTER):
    """A PIL image or HxWx3 uint8 array -> uint8 (size, size, 3) RGB, resized with one Pillow filter."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTERS[resize_filter])
    return np.asarray(image, dtype=np.uint8)


def _resize_all(images, count, desc, resize_filter):
    out = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # NxHxWx3
    for i, image in enumerate(tqdm(images, total=count, desc=desc, unit="img", leave=False)):
        out[i] = resize_image(image, IMAGE_SIZE, resize_filter)
    return out


# ---------------------------------------------------------------- the paper's datasets

def _require(title, paths, hint):
    """UserError naming every expected source file or folder that is not there."""
    by_folder = {}
    for p in paths:
        if not p.exists():
            by_folder.setdefault(p.parent, []).append(p.name)
    if by_folder:
        missing = [f"{folder / names[0]}" if len(names) == 1 else f"{folder}/{{{', '.join(names)}}}"
                   for folder, names in by_folder.items()]
        raise UserError(f"{title} source not found: expected {' and '.join(missing)} ({hint})")


def _open(dataset_class, title, where, download, **kwargs):
    """Construct a torchvision dataset; any failure becomes a one-line UserError naming the files."""
    try:
        return dataset_class(download=download, **kwargs)
    except Exception as err:  # torchvision raises RuntimeError, OSError, pickle and URL errors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if download:
            raise UserError(f"could not download {title} into {where}: {reason} (without internet, "
                            f"download the files by hand and pass their folder as --root)") from err
        if hasattr(sys.modules[dataset_class.__module__], "check_integrity"):
            hint = ("torchvision checks the md5 of the files: a truncated or altered download "
                    "fails; download it again, e.g. with --download")
        else:
            hint = "the files look incomplete; extract the archives again, or pass --download"
        raise UserError(f"cannot read {title} from {where}: {reason} ({hint})") from err


def _read_cifar10(root, split, download, resize_filter):
    folder = root / "cifar-10-batches-py"
    if not download:
        _require("CIFAR-10", [folder / f for f in CIFAR10_FILES],
                 "extract cifar-10-python.tar.gz into --root, or pass --download")
    ds = _open(tv_datasets.CIFAR10, "CIFAR-10", folder, download, root=str(root),
               train=split == "train")
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _read_svhn(root, split, download, resize_filter):
    path = root / f"{split}_32x32.mat"
    if not download:
        _require("SVHN", [path], "put the cropped-digits file there, or pass --download")
    ds = _open(tv_datasets.SVHN, "SVHN", path, download, root=str(root), split=split)
    return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), ds.labels.astype(np.int64)


def _read_gtsrb(root, split, download, resize_filter):
    base = root / "gtsrb"
    if split == "train":
        folder = base / "GTSRB" / "Training"
        expected = [folder]
    else:
        folder = base / "GTSRB" / "Final_Test" / "Images"
        expected = [folder, base / "GT-final_test.csv"]
    if not download:
        _require("GTSRB", expected, "extract GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip "
                                    "and GTSRB_Final_Test_GT.zip into --root/gtsrb, or pass --download")
    ds = _open(tv_datasets.GTSRB, "GTSRB", folder, download, root=str(root), split=split)
    labels = np.empty(len(ds), dtype=np.int64)

    def images():
        for i in range(len(ds)):
            image, labels[i] = ds[i]
            yield image
    x = _resize_all(images(), len(ds), f"gtsrb {split}", resize_filter)
    if split == "train":
        # torchvision numbers the class folders in sorted order; the class id is the folder's number
        folders = find_classes(folder)[0]
        try:
            class_ids = np.array([int(name) for name in folders], dtype=np.int64)
        except ValueError:
            raise UserError(f"GTSRB class folders in {folder} must be numbered (00000..00042), "
                            f"found {', '.join(folders[:5])}") from None
        labels = class_ids[labels]
    return x, labels


def _read_stl10(root, split, download, resize_filter):
    folder = root / "stl10_binary"
    if not download:
        # torchvision checks all five files whichever split is read
        _require("STL-10", [folder / f for f in STL10_FILES],
                 "extract stl10_binary.tar.gz into --root, or pass --download")
    tv_split = "unlabeled" if split == "train_unlabeled" else split
    ds = _open(tv_datasets.STL10, "STL-10", folder, download, root=str(root), split=tv_split)
    data = ds.data.transpose(0, 2, 3, 1)  # NxCxHxW -> NxHxWxC
    x = _resize_all(data, len(data), f"stl10 {split}", resize_filter)
    return x, np.asarray(ds.labels).astype(np.int64)


_READERS = {"cifar10": _read_cifar10, "svhn": _read_svhn, "gtsrb": _read_gtsrb, "stl10": _read_stl10}


def read_paper_split(name, split, root, download=False, resize_filter=DEFAULT_RESIZE_FILTER):
    """Read one split of cifar10, svhn, gtsrb or stl10 from torchvision's files -> (x NxHxWx3, y N)."""
    if name not in _READERS or split not in EXPECTED_SIZES[name]:
        raise UserError(f"no split {split!r} of dataset {name!r}; known: "
                        + "; ".join(f"{n}: {', '.join(s)}" for n, s in EXPECTED_SIZES.items()))
    return _READERS[name](Path(root), split, download, resize_filter)


# ---------------------------------------------------------------- checking what was written

def check_arrays(x, y, num_classes, where, size=IMAGE_SIZE, unlabeled=False):
    """Summary of a split's arrays; UserError if the shape, dtype or labels break the layout."""
    if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3):
        raise UserError(f"{where}: images must be uint8 (N, {size}, {size}, 3), got {x.dtype} {x.shape}")
    if len(x) == 0 or len(y) != len(x):
        raise UserError(f"{where}: {len(x)} images and {len(y)} labels (need as many, at least one)")
    if unlabeled and np.any(y != UNLABELED):
        raise UserError(f"{where}: unlabeled images must all carry label {UNLABELED}")
    if not unlabeled and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{where}: labels span {y.min()}..{y.max()}, outside 0..{num_classes - 1}")
    return {"images": len(x), "shape": tuple(x.shape[1:]), "dtype": str(x.dtype),
            "labels": f"{y.min()}..{y.max()} ({len(np.unique(y))} values)"}


def verify_split(path, num_classes, unlabeled=False):
    """Read a written split back and check it (count, shape, dtype, label range)."""
    x, y = read_images_npz(path, label_key="y")
    return check_arrays(x, y, num_classes, path, unlabeled=unlabeled)


def _finished(path, num_classes, unlabeled, force):
    """The summary of an existing split that validates, or None when it has to be (re)built."""
    if force or not path.is_file():
        return None
    try:
        return verify_split(path, num_classes, unlabeled)
    except UserError as err:
        print(f"rebuilding {path}: {err}", file=sys.stderr)
        return None


def _write_split(path, x, y, num_classes, unlabeled):
    check_arrays(x, y, num_classes, path, unlabeled=unlabeled)
    save_split(path, x, y)
    summary = verify_split(path, num_classes, unlabeled)
    if summary["images"] != len(x):
        raise UserError(f"{path}: wrote {len(x)} images but read back {summary['images']}")
    return summary


# ---------------------------------------------------------------- building splits

def prepare_paper_dataset(name, root, data_dir, download=False, force=False, resize_filter=DEFAULT_RESIZE_FILTER):
    """Write every split of a paper dataset that is not already there and valid; one row per split."""
    rows = []
    for split, expected in EXPECTED_SIZES[name].items():
        path = split_path(data_dir, name, split)
        unlabeled = split == "train_unlabeled"
        summary = _finished(path, NUM_CLASSES[name], unlabeled, force)
        status = "kept"
        if summary is None:
            x, y = read_paper_split(name, split, root, download, resize_filter=resize_filter)
            summary = _write_split(path, x, y, NUM_CLASSES[name], unlabeled)
            status = "written"
        rows.append(_split_row(name, split, summary, expected, status, path))
        if split == "train":
            rows[-1].update(write_normalization(data_dir, name))
    return rows


def _image_files(class_dir):
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _class_folders(folder):
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} holds no class sub-folders; expected DIR/<class>/<image>, or "
                        f"DIR/train/<class>/<image> and DIR/test/<class>/<image>")
    return classes


def _listing(folder, classes):
    """(path, label) of every image under folder/<class>, label = index of the class in `classes`."""
    items = []
    for name in _class_folders(folder):
        if name not in classes:
            raise UserError(f"{folder / name}: class {name!r} is not among the training classes "
                            f"({', '.join(classes)})")
        items += _class_items(folder / name, classes.index(name))
    return items


def _class_items(class_dir, label):
    files = _image_files(class_dir)
    if not files:
        raise UserError(f"class folder {class_dir} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    return [(p, label) for p in files]


def image_folder_items(folder, test_fraction=None, seed=0):
    """Class names (sorted folder names, label = position) and the (path, label) lists of each split.

    DIR/train/<class>/ and DIR/test/<class>/ give the two splits as they are; otherwise DIR/<class>/
    is split per class, a `test_fraction` share (default 0.2) of each class going to test, chosen
    by a permutation seeded with `seed`. Either way each split is then shuffled with that seed, so
    that the first images of a split (MIMIC's clean subset takes the first ratio*N) mix all classes.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        if test_fraction is not None:
            raise UserError(f"{folder} has train/ and test/ sub-folders, which fix the split; "
                            f"drop --test_fraction")
        _require("image folder", [folder / "train", folder / "test"],
                 "a split layout needs both train/ and test/ class folders")
        classes = _class_folders(folder / "train")
        splits = {"train": _listing(folder / "train", classes), "test": _listing(folder / "test", classes)}
    else:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        if not 0 < fraction < 1:
            raise UserError(f"--test_fraction must be between 0 and 1 (exclusive), got {fraction}")
        classes = _class_folders(folder)
        splits = {"train": [], "test": []}
        for label, name in enumerate(classes):
            items = _class_items(folder / name, label)
            n_test = min(int(np.floor(fraction * len(items) + 0.5)), len(items) - 1)
            order = rng.permutation(len(items))
            splits["test"] += [items[i] for i in order[:n_test]]
            splits["train"] += [items[i] for i in order[n_test:]]
    if not splits["test"]:
        raise UserError(f"{folder}: no image went to the test split (too few images per class?)")
    for split, items in splits.items():
        splits[split] = [items[i] for i in rng.permutation(len(items))]
    return classes, splits


def load_images(items, resize_filter=DEFAULT_RESIZE_FILTER, desc="images"):
    """Decode and resize the images of (path, label) items -> (x uint8 NxHxWx3, y int64 N)."""
    def images():
        for path, _ in items:
            try:
                with Image.open(path) as image:
                    image.load()
                    yield image
            except (OSError, Image.DecompressionBombError) as err:
                raise UserError(f"cannot read image {path}: {err}") from None
    x = _resize_all(images(), len(items), desc, resize_filter)
    return x, np.array([label for _, label in items], dtype=np.int64)


def prepare_image_folder(folder, name, data_dir, test_fraction=None, seed=0, force=False,
                         resize_filter=DEFAULT_RESIZE_FILTER):
    """Write <data_dir>/<name>/{train,test}.npz and classes.txt (label i = line i) from class folders."""
    check_dataset_name(name)
    classes_file = Path(data_dir) / name / "classes.txt"
    if classes_file.is_file() and not force:
        # both splits done: keep them without walking (or needing) the image folder again
        num_classes = len(classes_file.read_text().splitlines())
        done = {split: _finished(split_path(data_dir, name, split), num_classes, False, force)
                for split in ("train", "test")}
        if all(done.values()):
            rows = [_split_row(name, split, summary, None, "kept", split_path(data_dir, name, split))
                    for split, summary in done.items()]
            rows[0].update(write_normalization(data_dir, name))
            return rows
    classes, splits = image_folder_items(folder, test_fraction, seed)
    rows = []
    for split, items in splits.items():
        path = split_path(data_dir, name, split)
        summary = _finished(path, len(classes), False, force)
        status = "kept"
        if summary is None:
            x, y = load_images(items, resize_filter, desc=f"{name} {split}")
            summary = _write_split(path, x, y, len(classes), False)
            status = "written"
            _write_text(classes_file, "".join(f"{c}\n" for c in classes))
        rows.append(_split_row(name, split, summary, None, status, path))
        if split == "train":
            rows[-1].update(write_normalization(data_dir, name))
    return rows


def write_normalization(data_dir, name):
    """Compute the train split's normalisation statistics into <data_dir>/<name>/normalization.json.

    Datasets with fixed statistics (cifar10, stl10) get no file. A split the statistics cannot be
    computed from (a channel of one value) is only reported: the dataset still serves downstream.
    Returns {"normalization": text} for the train split's row, or {} when there is none.
    """
    if name in NORMALIZATION:
        return {}
    try:
        mean, std = normalization(name, data_dir)
    except UserError as err:
        print(f"warning: {err} (it can still be a downstream dataset, not a pre-training one)",
              file=sys.stderr)
        return {}

    def fmt(values):
        return ", ".join(f"{v:.4f}" for v in values)
    cache = split_path(data_dir, name, "train").with_name(CACHE_NAME)
    return {"normalization": f"mean ({fmt(mean)}), std ({fmt(std)}) in {cache}"}


def _split_row(name, split, summary, expected, status, path):
    return {"dataset": name, "split": split, **summary, "expected": expected, "status": status,
            "path": str(path)}


def _write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, write)


# ---------------------------------------------------------------- reference inputs

def reference_path(reference_dir, pretraining_dataset, name):
    """<reference_dir>/<pretraining_dataset>/<name>.npz; both names are plain file names, so the
    file cannot land outside the reference folder."""
    for what, value in (("the reference name", name), ("the pretraining dataset", pretraining_dataset)):
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            raise UserError(f"{what} must be a plain file name without folders, got {value!r}")
    return Path(reference_dir) / pretraining_dataset / f"{name}.npz"


def thumbnails(images, size=MEDOID_SIZE):
    """uint8 NxHxWx3 -> float Nx(size*size): each image in grayscale (Pillow's ITU-R 601-2 luma),
    box-averaged to size x size, so that small shifts and pixel noise weigh little."""
    return np.stack([np.asarray(Image.fromarray(im).convert("L").resize((size, size), Image.Resampling.BOX),
                                dtype=np.float64).ravel() for im in images])


def pick_reference(images, count, pick=DEFAULT_REFERENCE_PICK, pool=MEDOID_POOL):
    """Indices of `count` reference images among `images` (one class, in train-split order).

    "first": the first `count`. "medoid": among the first `pool` images, those with the smallest
    mean Euclidean distance from their thumbnail (see thumbnails) to the other candidates'
    thumbnails, most central first; ties go to the earlier image. The medoid is the class's most
    typical view, where the first image may be any odd one (dark, cut off, off-centre).
    """
    if pick == "first" or len(images) <= count:
        return np.arange(min(count, len(images)))
    if pick != "medoid":
        raise ValueError(f"pick must be one of {REFERENCE_PICKS}, not {pick!r}")
    thumbs = thumbnails(images[:max(pool, count)])                  # PxS
    sq = (thumbs ** 2).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * thumbs @ thumbs.T, 0))   # PxP
    mean = dist.sum(axis=1) / (len(thumbs) - 1)
    return np.argsort(mean, kind="stable")[:count]


def make_reference(data_dir, dataset, label, out_path, count=DEFAULT_REFERENCE_COUNT, force=False,
                   pick=DEFAULT_REFERENCE_PICK):
    """Write `count` training images of class `label` of a prepared dataset as a reference file,
    chosen by `pick` (pick_reference: the class's medoid, or its first images).

    The file holds x uint8 (R, H, W, 3) and y (R,) = label. An existing file that is a valid reference
    file of that label is kept unless `force`.
    """
    out_path = Path(out_path)
    row = {"file": str(out_path), "source": f"{dataset} train ({pick})", "label": label}
    if out_path.is_file() and not force:
        try:
            x, y = read_images_npz(out_path, label_key="y")
            if len(x) and np.all(y == label):
                return {**row, "images": len(x), "status": "kept"}
            print(f"rebuilding {out_path}: labels {sorted(set(y.tolist()))} are not {label}",
                  file=sys.stderr)
        except UserError as err:
            print(f"rebuilding {out_path}: {err}", file=sys.stderr)
    if count < 1:
        raise UserError(f"--reference_count must be at least 1, got {count}")
    path = split_path(data_dir, dataset, "train")
    if not path.is_file():
        raise UserError(f"dataset file not found: {path} (a reference file is cut from its train "
                        f"split; create it with: python prepare_data.py --dataset {dataset} "
                        f"--out {data_dir})")
    x, y = read_images_npz(path, label_key="y")
    index = np.flatnonzero(y == label)
    if len(index) < count:
        raise UserError(f"{path} holds {len(index)} images of class {label}, fewer than the {count} "
                        f"asked for (lower --reference_count)")
    ref_x = x[index[pick_reference(x[index], count, pick)]]
    save_reference(out_path, ref_x, label)
    back_x, back_y = read_images_npz(out_path, label_key="y")
    if back_x.shape != ref_x.shape or np.any(back_y != label):
        raise UserError(f"{out_path}: read back {back_x.shape} with labels {set(back_y.tolist())}")
    return {**row, "images": len(back_x), "status": "written"}


def md5(path):
    """Hex md5 of a file's bytes."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def check_released_references(reference_dir):
    """Verify the shipped reference files of the paper's tasks against paper.RELEASED_REFERENCES.

    Never writes: the released files are the authors' bytes, not something to rebuild. One row per
    file ("released, md5 ok"); a missing or altered file is one UserError line naming every such
    file and the git command that restores it.
    """
    rows, bad = [], []
    for usage, name, dataset, label in PAPER_REFERENCES:
        path = reference_path(reference_dir, usage, name)
        shipped = f"reference/{usage}/{name}.npz"
        expected = RELEASED_REFERENCES[shipped]
        if not path.is_file():
            bad.append((shipped, f"{path} is missing"))
            continue
        found = md5(path)
        if found != expected:
            bad.append((shipped, f"{path} has md5 {found}, not the released {expected}"))
            continue
        rows.append({"file": str(path), "source": f"released ({dataset} class {label})", "label": label,
                     "images": len(read_images_npz(path, label_key="y")[0]), "status": "released, md5 ok"})
    if bad:
        raise UserError(f"{'; '.join(why for _, why in bad)}: restore the authors' file"
                        f"{'s' if len(bad) > 1 else ''} with: git checkout -- "
                        f"{' '.join(dict.fromkeys(shipped for shipped, _ in bad))}")
    return rows


# ---------------------------------------------------------------- reporting

def size_warnings(rows):
    """One line per split whose count differs from the official release's."""
    return [f"{r['dataset']} {r['split']} holds {r['images']:,} images, the official release "
            f"{r['expected']:,} (fine for a subset)"
            for r in rows if r.get("expected") is not None and r["images"] != r["expected"]]


def format_table(rows, columns):
    """Rows of dicts as a plain-text table with a header; integers get thousands separators."""
    def cell(value):
        if value is None:
            return "-"
        return f"{value:,}" if isinstance(value, (int, np.integer)) else str(value)
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [columns] + cells
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
