"""The one source of per-channel normalisation statistics (mean, std of pixels scaled to [0, 1]).

Where the numbers come from, in order:
1. the encoder checkpoint's own `normalization` entry (`resolve_normalization`): an encoder is
   normalised the way it was trained, whatever dataset it is used with later;
2. the fixed table below: the published CIFAR-10 and STL-10 values, and the synthetic demo's;
3. any other dataset: computed exactly from <data_dir>/<name>/train.npz and cached next to it as
   normalization.json, which is recomputed when train.npz changes (size or modification time).
"""
import contextlib
import json
import math
import sys
import zipfile
import zlib

import numpy as np

from utils.errors import UserError
from utils.files import save_json

from .npz import load_split, npy_image_shape, read_images_npz, split_path

# Per-channel mean and std of the pre-training set an encoder was trained on (its "usage info").
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "stl10": ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)),
    "demo_pretrain": ((0.4286, 0.4334, 0.4270), (0.2159, 0.2268, 0.2103)),  # datasets/demo.py, seed 0
}
CACHE_NAME = "normalization.json"
CHANNELS = "RGB"
CHUNK_BYTES = 1 << 22  # images read per step: about 4 MB of uint8 pixels (4096 CIFAR images)


def normalization(name, data_dir=None):
    """(mean, std) for an encoder usage name: tuples of 3 floats for pixels scaled to [0, 1].

    The table's values for cifar10, stl10 and demo_pretrain; for any other name the statistics of
    <data_dir>/<name>/train.npz, computed once and cached in normalization.json beside it.
    """
    mean, std, _ = _lookup(name, data_dir)
    return mean, std


def normalization_record(name, mean, std):
    """The `normalization` entry a checkpoint carries: the statistics its encoder was trained with."""
    return {"dataset": name, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def resolve_normalization(ckpt, name, data_dir, flag_given, flag="--pretraining_dataset", path=None):
    """(mean, std, source) to normalise the inputs of the encoder in `ckpt` (a checkpoint dict).

    A checkpoint carrying `normalization` (see normalization_record) is normalised with it; an
    explicit `flag` naming another dataset, or one whose statistics differ from the checkpoint's,
    is refused rather than silently overridden. A checkpoint without it (BadEncoder's released
    encoders, this project's older ones) is normalised as `normalization(name, data_dir)`. path:
    the checkpoint's file, named when its entry is malformed.
    """
    record = ckpt.get("normalization") if isinstance(ckpt, dict) else None
    if record is None:
        return _lookup(name, data_dir)
    trained_on, mean, std = _read_record(record, path)
    source = f"the encoder checkpoint (trained on {trained_on})"
    if not flag_given:
        return mean, std, source
    conflict = f"{flag} {name} disagrees with the encoder's own normalisation (trained on {trained_on}, " \
               f"mean {_fmt(mean)}, std {_fmt(std)})"
    if name != trained_on:
        raise UserError(f"{conflict}; drop the flag or pass {trained_on}")
    if name in NORMALIZATION or (data_dir is not None and split_path(data_dir, name, "train").is_file()):
        flag_mean, flag_std, flag_source = _lookup(name, data_dir)
        if not (_close(flag_mean, mean) and _close(flag_std, std)):
            raise UserError(f"{conflict}: {flag_source} gives mean {_fmt(flag_mean)}, std "
                            f"{_fmt(flag_std)} (the data changed since training?); drop the flag to "
                            f"normalise as the encoder was trained")
    return mean, std, source


def compute_statistics(path):
    """Exact per-channel (mean, std, images) of the x images of an npz split, pixels scaled to [0, 1].

    One pass over the images in chunks counts how often each of the 256 values occurs in each
    channel; the integer counts give the sums and sums of squares exactly, so mean and population
    std (ddof=0) are each rounded once, to float. Memory stays at one chunk whatever N is.
    """
    counts = np.zeros((3, 256), dtype=np.int64)  # Cx256 histogram
    images = 0
    for chunk in _image_chunks(path):  # kxHxWx3 uint8
        pixels = chunk.reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(pixels[:, c], minlength=256)
        images += len(chunk)
    n = int(counts[0].sum())
    if n == 0:
        what = "holds no images" if images == 0 else f"holds {images} images without pixels"
        raise UserError(f"{path} {what}; the normalisation statistics are computed from the train "
                        f"split — rebuild it with images (python prepare_data.py ... --force)")
    values = np.arange(256, dtype=np.int64)
    sums = [int(counts[c] @ values) for c in range(3)]
    squares = [int(counts[c] @ values ** 2) for c in range(3)]
    numerators = [n * q - s * s for s, q in zip(sums, squares)]  # n^2 * 255^2 * variance, exact
    flat = [CHANNELS[c] for c in range(3) if numerators[c] == 0]
    if flat:
        which = f"channel {flat[0]} has" if len(flat) == 1 else f"channels {', '.join(flat)} have"
        raise UserError(f"{path}: {which} standard deviation 0 (every pixel is the same); the encoder "
                        f"cannot normalise it — check the images")
    mean = tuple(s / (255 * n) for s in sums)
    std = tuple(math.sqrt(num / (255 * 255 * n * n)) for num in numerators)
    return mean, std, images


def _lookup(name, data_dir):
    if name in NORMALIZATION:
        mean, std = NORMALIZATION[name]
        return tuple(map(float, mean)), tuple(map(float, std)), f"the fixed values for {name}"
    if data_dir is None:
        raise UserError(f"no normalisation statistics for {name!r}; known: {', '.join(NORMALIZATION)} "
                        f"(for another dataset they are computed from <data_dir>/{name}/train.npz: "
                        f"pass --data_dir, or create the dataset with python prepare_data.py)")
    path = split_path(data_dir, name, "train")
    if not path.is_file():
        load_split(data_dir, name, "train")  # raises its "dataset file not found ... create it" error
    cache = path.with_name(CACHE_NAME)
    stat = path.stat()  # taken before reading: a file changed meanwhile mismatches the cache later
    cached = _read_cache(cache, stat)
    if cached is not None:
        return cached[0], cached[1], str(cache)
    mean, std, images = compute_statistics(path)
    try:
        save_json(cache, {"mean": list(mean), "std": list(std), "source": path.name, "images": images,
                          "train_npz_size": stat.st_size, "train_npz_mtime": stat.st_mtime})
    except OSError as err:
        print(f"warning: cannot cache the normalisation statistics in {cache} ({err.strerror}); "
              f"they are computed again next time", file=sys.stderr)
    return mean, std, str(cache)


def _read_cache(cache, stat):
    """(mean, std) from a cache file that matches train.npz's size and mtime, else None."""
    try:
        record = json.loads(cache.read_text())
        if record["train_npz_size"] != stat.st_size or record["train_npz_mtime"] != stat.st_mtime:
            return None
        mean, std = _three(record["mean"]), _three(record["std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if min(std) <= 0:
        return None
    return mean, std


def _read_record(record, path=None):
    """(dataset, mean, std) of a checkpoint's normalization entry; a UserError naming the checkpoint
    file (path) when the entry is not one normalization_record writes."""
    where = f"the encoder checkpoint {path}:" if path else "the encoder checkpoint's"
    expected = "{'dataset': name, 'mean': [3 floats], 'std': [3 positive floats]}"
    if not isinstance(record, dict):
        raise UserError(f"{where} normalization entry is a {type(record).__name__} ({record!r}), not {expected}; "
                        f"the file is damaged or was not written by this project")
    try:
        dataset, mean, std = str(record["dataset"]), _three(record["mean"]), _three(record["std"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{where} normalization entry is malformed ({err}); expected {expected}") from None
    if min(std) <= 0:
        raise UserError(f"{where} normalization entry has std {_fmt(std)}; a standard deviation must be positive, "
                        f"so the file is damaged")
    return dataset, mean, std


def _three(values):
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"need 3 finite numbers, got {values}")
    return values


def _close(a, b):
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def _fmt(values):
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _image_chunks(path):
    """Yield the x array of an npz split in chunks of whole images without loading it all.

    The npz member x.npy is read as a stream (stored or deflated alike). Anything unusual (not a
    zip, no x or y, another dtype or layout) is handed to read_images_npz, which loads the file
    whole and raises its usual message when the file breaks the layout.
    """
    with contextlib.ExitStack() as stack:
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
            if "y.npy" not in archive.namelist():
                raise KeyError("y.npy")
            fh = stack.enter_context(archive.open("x.npy"))
            shape = npy_image_shape(fh)
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError):
            shape = None
        if shape is None:
            yield read_images_npz(path, label_key="y")[0]
            return
        per_image = shape[1] * shape[2] * 3
        step = max(1, CHUNK_BYTES // max(per_image, 1))
        for start in range(0, shape[0], step):
            k = min(step, shape[0] - start)
            try:
                data = fh.read(k * per_image)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
                raise UserError(f"cannot read {path}: {err}") from None
            if len(data) != k * per_image:
                raise UserError(f"cannot read {path}: x ends after {start} of {shape[0]} images")
            yield np.frombuffer(data, dtype=np.uint8).reshape(k, *shape[1:])


def encoder_normalization(ckpt, path, name, data_dir, flag="--pretraining_dataset"):
    """(dataset name, mean, std) for the encoder in `ckpt` (read from the file `path`), for a stage
    that reads an encoder.

    name is the stage's --pretraining_dataset (None when not given): without it the encoder's own
    statistics are used, or, for a checkpoint that carries none, cifar10's (the published default).
    """
    record = ckpt.get("normalization") if isinstance(ckpt, dict) else None
    trained_on = _read_record(record, path)[0] if record is not None else None
    resolved = name or trained_on or "cifar10"
    mean, std, source = resolve_normalization(ckpt, resolved, data_dir, name is not None, flag, path)
    print(f"normalisation of {resolved}: mean {_fmt(mean)}, std {_fmt(std)} ({source})")
    return resolved, mean, std
