"""Dataset splits in the BadEncoder npz layout: x uint8 (N, H, W, 3), y integer (N, 1) or (N,)."""
import zipfile
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write


def split_path(data_dir, name, split):
    return Path(data_dir) / name / f"{split}.npz"


def split_input(data_dir, name, split):
    """{role: path} of one split, as a stage's input_files declares it (utils.fingerprint)."""
    return {f"data:{name}/{split}": split_path(data_dir, name, split)}


def check_labels(y, path, max_classes=100_000):
    """Labels are class indices: integers in 0..max_classes-1."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {y.dtype}")
    if y.size == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise UserError(f"{path}: labels must be non-negative class indices, found {low}")
    if high >= max_classes:
        raise UserError(f"{path}: label {high} is not a class index (more than {max_classes} classes); "
                        f"labels must be 0..C-1")


def check_split(x, y, path, min_size=8, max_classes=100_000):
    """A split the encoder can use: at least one image, images at least min_size pixels each way
    (the ResNet downsamples 8x), one valid label per image. x: NxHxWx3."""
    if len(x) == 0:
        raise UserError(f"{path} holds no images; a split needs at least one")
    if len(y) != len(x):
        raise UserError(f"{path}: {len(x)} images but {len(y)} labels")
    height, width = x.shape[1], x.shape[2]
    if height < min_size or width < min_size:
        raise UserError(f"{path}: images are {height}x{width} pixels; the encoder needs at least "
                        f"{min_size}x{min_size} (it downsamples them 8 times)")
    check_labels(y, path, max_classes)


def check_reference_labels(y, path):
    """All reference inputs carry the one target label; returns it."""
    labels = np.unique(np.asarray(y))
    if labels.size == 0:
        raise UserError(f"reference file {path} holds no reference inputs")
    if labels.size > 1:
        shown = [str(v) for v in labels[:5]]
        listed = ", ".join(shown[:-1]) + f" and {shown[-1]}" + (" ..." if labels.size > 5 else "")
        raise UserError(f"reference file {path} holds labels {listed}; every reference input must have "
                        f"the target label")
    label = int(labels[0])
    if label < 0:
        raise UserError(f"reference file {path} holds label {label}; the target label must be a "
                        f"non-negative class index")
    return label


def load_split(data_dir, name, split):
    """Return (x, y) of data/<name>/<split>.npz: x uint8 NxHxWx3, y int64 N. Checks keys, shapes,
    that the split is not empty, that the images are large enough and that labels are class
    indices (an unlabeled split's labels, -1 in STL-10's, are not checked)."""
    path = split_path(data_dir, name, split)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path} (create it with: python prepare_data.py "
                        f"--dataset {name} --out {data_dir}, or pass --data_dir)")
    x, y = read_images_npz(path, label_key="y")
    check_split(x, y if split in LABELLED_SPLITS else np.zeros_like(y), path)
    return x, y


LABELLED_SPLITS = ("train", "test")
# Pre-training datasets whose encoders the authors train on an unlabeled split (SimCLR, the
# BadEncoder shadow data and MIMIC's distillation), and how many of its images are shadow data.
UNLABELED_SPLIT = {"stl10": "train_unlabeled"}
UNLABELED_SHADOW_IMAGES = 50_000


def pretraining_split(name, choice="auto"):
    """The split a stage trains on for --pretraining_split choice: auto = the dataset's unlabeled
    split where the authors use one (STL-10), else train."""
    return UNLABELED_SPLIT.get(name, "train") if choice == "auto" else choice


def read_images_npz(path, label_key):
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", label_key) if k not in npz.files]
            if missing:
                raise UserError(f"{path} lacks key(s) {', '.join(missing)}; expected x (N,H,W,3) uint8 "
                                f"and {label_key} (N,) or (N,1) integer labels")
            x, y = npz["x"], npz[label_key]
    except UserError:
        raise
    except Exception as err:  # np.load raises many types on a corrupt file
        raise UserError(f"cannot read {path}: {err}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f"{path}: x must be uint8 of shape (N, H, W, 3), got {x.dtype} {x.shape}")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: {label_key} must be {len(x)} integer labels of shape (N,) or (N, 1), "
                        f"got {y.dtype} {y.shape}")
    return x, y.astype(np.int64)


def save_split(path, x, y):
    """Write x (uint8 NxHxWx3) and y as (N, 1), the layout of the BadEncoder data release."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=np.int64).reshape(-1, 1)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, x=np.ascontiguousarray(x, dtype=np.uint8), y=y)
    atomic_write(path, write)


def save_reference(path, x, label):
    """Write reference inputs: x uint8 (R, H, W, 3) and y (R,) filled with the target label."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.full(len(x), label, dtype=np.int64)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, x=np.ascontiguousarray(x, dtype=np.uint8), y=y)
    atomic_write(path, write)


def load_reference(path):
    """Reference inputs of the attacker's target class: (x uint8 RxHxWx3, target label)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference file not found: {path}")
    x, y = read_images_npz(path, label_key="y")
    return x, check_reference_labels(y, path)


def check_dataset_name(name):
    """A dataset is one plain folder under the data folder: a name with a path in it is refused, so
    nothing is written outside the data folder."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"dataset name {name!r} must be a plain folder name (no path separators)")


def check_reference_label(label, path, what, fix):
    """The reference file at `path` must hold inputs of the target class `label`, else a UserError:
    `what` names the label (e.g. '--reference_label 5'), `fix` says what to do."""
    _, ref_label = load_reference(path)
    if label != ref_label:
        raise UserError(f"{what} differs from the label {ref_label} of the reference file {path}; the reference "
                        f"inputs must be of the target class ({fix})")


def read_npy_header(fh):
    """(shape, fortran_order, dtype) from the .npy header fh starts with; fh is left after it."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"npy format version {version}")


def npy_image_shape(fh):
    """Shape of the uint8 (N, H, W, 3) C-order array whose .npy header fh starts with; else ValueError."""
    shape, fortran, dtype = read_npy_header(fh)
    if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError("not a C-order uint8 (N, H, W, 3) array")
    return shape


def npz_shape(path, key):
    """Shape of one array of an .npz, read from its .npy header without loading the array."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
            return read_npy_header(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {key} of {path}: {err}") from None
