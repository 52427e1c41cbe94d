"""Embedded demo data: small synthetic image sets that let the whole pipeline run on a CPU.

Regenerate with:
    python -m datasets.demo

Writes, in the BadEncoder npz layout (x uint8 Nx32x32x3, y Nx1):
    data/demo_pretrain/{train,test}.npz     10 shape/texture classes, for SimCLR and BadEncoder
    data/demo_downstream/{train,test}.npz   10 different but related classes, for the downstream task
    reference/demo/<class>.npz              one reference input of the target class: its prototype
                                            (or, with --n_reference R, its first R training images)
and a generator.json next to each dataset recording how it was made. DRUPE's three-image
reference of the target class, reference/demo/hexagon_n3.npz (demo_drupe_task), is rebuilt with
    python -m datasets.demo --n_reference 3 --reference_name hexagon_n3

Each image is one object on a cluttered background. The class is carried by the object's
shape or texture only: the colours (object and background), position, size, rotation,
aspect, background gradient, blotches, clutter strokes and pixel noise are all drawn
independently of the class. Pixel values stay at or below MAX_VALUE, so no demo image
contains the pure white (255) patch of the default trigger, and no class lives in a corner.

Everything is pure numpy and seeded: the same seed gives the same bytes (on a given numpy
build), and each split draws from its own stream, so changing one split's size leaves the
others unchanged.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from paper import DRUPE_REFERENCE_IMAGES, Task
from utils.cli import run_cli
from utils.errors import UserError
from utils.files import atomic_write

from .npz import load_split, read_images_npz, save_reference, save_split, split_path

IMAGE_SIZE = 32
MAX_VALUE = 235  # brightest pixel value a demo image may hold; the trigger patch is 255
GENERATOR_VERSION = 1

PRETRAIN_NAME = "demo_pretrain"
DOWNSTREAM_NAME = "demo_downstream"
PRETRAIN_CLASSES = ("disc", "ring", "triangle", "square_outline", "plus", "star", "crescent",
                    "stripes", "checkerboard", "dots")
DOWNSTREAM_CLASSES = ("ellipse", "hexagon", "triangle_outline", "nested_squares", "l_shape", "sparkle",
                      "arc", "bullseye", "waves", "grid")
CLASSES = {PRETRAIN_NAME: PRETRAIN_CLASSES, DOWNSTREAM_NAME: DOWNSTREAM_CLASSES}
SPLIT_IDS = {"train": 0, "test": 1}
USAGE = "demo"  # encoder usage name: its normalisation entry and its folder under reference/

DEFAULTS = {
    "n_pretrain_train": 6000,
    "n_pretrain_test": 1000,
    "n_down_train": 3000,
    "n_down_test": 1000,
    "target_class": DOWNSTREAM_CLASSES.index("hexagon"),
    "n_reference": 0,
    "seed": 0,
}


def demo_task():
    """The demo's downstream task: the target class of DEFAULTS, with the reference file
    make_demo_data writes for it (paths relative to the repository root)."""
    target = DEFAULTS["target_class"]
    return Task(PRETRAIN_NAME, DOWNSTREAM_NAME, target, f"reference/{USAGE}/{DOWNSTREAM_CLASSES[target]}.npz")


def demo_drupe_task():
    """The demo's task for DRUPE, which needs several reference inputs (the std over them is one of
    its terms): the target class's first DRUPE_REFERENCE_IMAGES (3) training images, in
    reference/demo/<class>_n3.npz. Committed; the module docstring gives the command that rebuilds it."""
    task = demo_task()
    name = f"{DOWNSTREAM_CLASSES[task.label]}_n{DRUPE_REFERENCE_IMAGES}"
    return Task(task.pretraining, task.dataset, task.label, f"reference/{USAGE}/{name}.npz")


# ---------------------------------------------------------------- signed distances
# Every shape is a signed distance in pixels (negative inside) over local coordinates x, y
# (n x H x W, object centred at 0, already rotated); sizes are n x 1 x 1 arrays.

def _box(x, y, half_x, half_y):
    return np.maximum(np.abs(x) - half_x, np.abs(y) - half_y)


def _circle(x, y, radius):
    return np.hypot(x, y) - radius


def _star(x, y, outer, inner, points):
    """Star with `points` tips at radius `outer` and notches at `inner`; a regular polygon when
    inner = outer * cos(pi / points). Folds the plane into one half-wedge, where the shape is
    the triangle between the centre, a tip and a notch, and measures to the tip-notch edge."""
    half = np.pi / points
    angle = np.mod(np.arctan2(y, x), 2 * half)
    angle = half - np.abs(angle - half)  # 0 at a tip, half at a notch
    radius = np.hypot(x, y)
    qx, qy = radius * np.cos(angle), radius * np.sin(angle)
    ex, ey = inner * np.cos(half) - outer, inner * np.sin(half)  # tip -> notch
    length = np.hypot(ex, ey)
    return (ey * (qx - outer) - ex * qy) / length


def _bands(u, period, duty):
    """Parallel bands across u: inside where u lies within duty*period/2 of a multiple of period."""
    offset = np.abs(u / period - np.round(u / period)) * period
    return offset - duty * period / 2


def _patch(x, y, size, rng):
    """Region a texture fills: a rectangle or a disc (chosen at random) of about `size`."""
    n = len(size)
    half_x = size * rng.uniform(0.8, 1.15, (n, 1, 1))
    half_y = size * rng.uniform(0.8, 1.15, (n, 1, 1))
    is_disc = rng.random((n, 1, 1)) < 0.5
    return np.where(is_disc, _circle(x, y, 1.15 * size), _box(x, y, half_x, half_y))


def _u(rng, low, high, n):
    return rng.uniform(low, high, (n, 1, 1))


# ---------------------------------------------------------------- pre-training classes

def _disc(x, y, size, rng):
    return _circle(x, y, size)


def _ring(x, y, size, rng):
    return np.abs(_circle(x, y, size * 0.8)) - _u(rng, 1.2, 2.2, len(size))


def _triangle(x, y, size, rng):
    return _star(x, y, size * 1.15, size * 1.15 * np.cos(np.pi / 3), 3)


def _square_outline(x, y, size, rng):
    return np.abs(_box(x, y, size * 0.8, size * 0.8)) - _u(rng, 1.0, 2.0, len(size))


def _plus(x, y, size, rng):
    arm = _u(rng, 1.5, 2.6, len(size))
    return np.minimum(_box(x, y, size, arm), _box(x, y, arm, size))


def _star5(x, y, size, rng):
    return _star(x, y, size * 1.1, size * 1.1 * _u(rng, 0.38, 0.5, len(size)), 5)


def _crescent(x, y, size, rng):
    shift = size * _u(rng, 0.45, 0.6, len(size))
    return np.maximum(_circle(x, y, size), -_circle(x - shift, y, size * 0.85))


def _stripes(x, y, size, rng):
    n = len(size)
    return np.maximum(_patch(x, y, size, rng), _bands(x, _u(rng, 4.0, 6.5, n), _u(rng, 0.4, 0.6, n)))


def _checkerboard(x, y, size, rng):
    cell = _u(rng, 2.5, 4.5, len(size))
    wave = np.sin(np.pi * x / cell) * np.sin(np.pi * y / cell)
    return np.maximum(_patch(x, y, size, rng), -wave * cell / np.pi)


def _dots(x, y, size, rng):
    n = len(size)
    period = _u(rng, 4.5, 6.5, n)
    dx = (x / period - np.round(x / period)) * period
    dy = (y / period - np.round(y / period)) * period
    return np.maximum(_patch(x, y, size, rng), _circle(dx, dy, period * _u(rng, 0.25, 0.33, n)))


# ---------------------------------------------------------------- downstream classes

def _ellipse(x, y, size, rng):
    minor = size * _u(rng, 0.4, 0.6, len(size))
    return (np.hypot(x / size, y / minor) - 1) * minor


def _hexagon(x, y, size, rng):
    return _star(x, y, size, size * np.cos(np.pi / 6), 6)


def _triangle_outline(x, y, size, rng):
    outer = size * 1.15
    return np.abs(_star(x, y, outer, outer * np.cos(np.pi / 3), 3)) - _u(rng, 1.0, 1.8, len(size))


def _nested_squares(x, y, size, rng):
    n = len(size)
    outer, width = size * 0.85, _u(rng, 1.0, 1.5, n)
    inner = outer * _u(rng, 0.4, 0.5, n)
    return np.minimum(np.abs(_box(x, y, outer, outer)), np.abs(_box(x, y, inner, inner))) - width


def _l_shape(x, y, size, rng):
    arm = _u(rng, 1.6, 2.6, len(size))
    vertical = _box(x + size - arm, y, arm, size)
    horizontal = _box(x, y - size + arm, size, arm)
    return np.minimum(vertical, horizontal)


def _sparkle(x, y, size, rng):
    return _star(x, y, size * 1.15, size * 1.15 * _u(rng, 0.22, 0.32, len(size)), 4)


def _arc(x, y, size, rng):
    """A thick ring with a gap of 70-115 degrees: a 'C'."""
    n = len(size)
    radius = np.hypot(x, y)
    ring = np.abs(radius - size * 0.8) - _u(rng, 1.5, 2.4, n)
    gap = (_u(rng, 0.6, 1.0, n) - np.abs(np.arctan2(y, x))) * radius  # positive inside the gap
    return np.maximum(ring, gap)


def _bullseye(x, y, size, rng):
    n = len(size)
    radius = np.hypot(x, y)
    return np.maximum(radius - size, _bands(radius, size / _u(rng, 2.4, 3.2, n), _u(rng, 0.4, 0.55, n)))


def _waves(x, y, size, rng):
    n = len(size)
    u = y + _u(rng, 2.0, 3.0, n) * np.sin(2 * np.pi * x / _u(rng, 8.0, 12.0, n))
    return np.maximum(_patch(x, y, size, rng), _bands(u, _u(rng, 4.5, 6.5, n), _u(rng, 0.4, 0.55, n)))


def _grid(x, y, size, rng):
    n = len(size)
    period, duty = _u(rng, 4.5, 6.5, n), _u(rng, 0.25, 0.35, n)
    lines = np.minimum(_bands(x, period, duty), _bands(y, period, duty))
    return np.maximum(_patch(x, y, size, rng), lines)


SHAPES = {
    "disc": _disc, "ring": _ring, "triangle": _triangle, "square_outline": _square_outline,
    "plus": _plus, "star": _star5, "crescent": _crescent, "stripes": _stripes,
    "checkerboard": _checkerboard, "dots": _dots,
    "ellipse": _ellipse, "hexagon": _hexagon, "triangle_outline": _triangle_outline,
    "nested_squares": _nested_squares, "l_shape": _l_shape, "sparkle": _sparkle, "arc": _arc,
    "bullseye": _bullseye, "waves": _waves, "grid": _grid,
}


# ---------------------------------------------------------------- rendering

def _luminance(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


def _object_colours(background, rng, min_contrast=70.0):
    """Object colours with at least `min_contrast` grey levels of luminance against the background
    (so the shape survives grayscale); redrawn until they are, so colour never depends on class."""
    colours = rng.uniform(0, 220, background.shape)
    low = np.abs(_luminance(colours) - _luminance(background)) < min_contrast
    while low.any():
        colours[low] = rng.uniform(0, 220, (low.sum(), 3))
        low = np.abs(_luminance(colours) - _luminance(background)) < min_contrast
    return colours


def _smooth_noise(rng, n, cells, size):
    """Low-frequency noise: a random cells x cells grid, bilinearly upsampled to size x size."""
    grid = rng.normal(0, 1, (n, cells, cells))
    pos = (np.arange(size) + 0.5) * (cells - 1) / size
    lo = np.minimum(pos.astype(int), cells - 2)
    frac = pos - lo
    up = np.zeros((size, cells))
    up[np.arange(size), lo] = 1 - frac
    up[np.arange(size), lo + 1] = frac
    return up @ grid @ up.T  # n x size x size


def _segment(x, y, x0, y0, x1, y1):
    """Distance from each pixel to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def _over(image, colour, alpha):
    """Paint `colour` (n x 3) over `image` (n x H x W x 3, float32, in place) with coverage
    `alpha` (n x H x W): image += alpha * (colour - image)."""
    image += alpha[..., None].astype(np.float32) * (colour[:, None, None, :].astype(np.float32) - image)


def render(shapes, labels, rng, chunk=1000):
    """Draw one image per label, `chunk` images at a time to bound memory (the chunk size is
    part of the random stream: keep it fixed)."""
    return np.concatenate([_render_chunk(shapes, labels[i:i + chunk], rng)
                           for i in range(0, len(labels), chunk)])


def _render_chunk(shapes, labels, rng):
    """Draw one image per label: uint8 n x 32 x 32 x 3, the object of class shapes[label] on a
    random background. All nuisance factors are drawn for every image before the class is used."""
    n, size = len(labels), IMAGE_SIZE
    pix = np.arange(size) + 0.5
    gx, gy = pix[None, None, :], pix[None, :, None]  # pixel centres, broadcast against n x 1 x 1

    # background: a linear gradient between two colours, coloured blotches, then clutter strokes
    colour_a, colour_b = rng.uniform(0, 220, (n, 3)), rng.uniform(0, 220, (n, 3))
    direction = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ramp = ((gx - size / 2) * np.cos(direction) + (gy - size / 2) * np.sin(direction)) / size + 0.5
    ramp = np.clip(ramp, 0, 1)[..., None]
    image = colour_a[:, None, None] * (1 - ramp) + colour_b[:, None, None] * ramp
    image += _smooth_noise(rng, n, 5, size)[..., None] * rng.uniform(0, 14, (n, 1, 1, 3))
    image = image.astype(np.float32)
    background = image.mean(axis=(1, 2))
    for _ in range(2):
        present = rng.random(n) < 0.3
        ends = rng.uniform(-4, size + 4, (4, n, 1, 1))
        width = rng.uniform(0.4, 0.9, (n, 1, 1))
        alpha = np.clip(width + 0.5 - _segment(gx, gy, *ends), 0, 1) * present[:, None, None]
        _over(image, rng.uniform(0, 220, (n, 3)), alpha * rng.uniform(0.3, 0.8, (n, 1, 1)))

    # object pose and colour, independent of the class
    object_colour = _object_colours(background, rng)
    shade = rng.uniform(-25, 25, (n, 1, 1, 1)) * (gy[..., None] - size / 2) / size
    centre_x, centre_y = rng.uniform(9, 23, (n, 1, 1)), rng.uniform(9, 23, (n, 1, 1))
    theta = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    stretch = rng.uniform(0.87, 1.15, (n, 1, 1))
    scale = rng.uniform(8.5, 13.0, (n, 1, 1))
    lx = ((gx - centre_x) * np.cos(theta) + (gy - centre_y) * np.sin(theta)) * stretch
    ly = (-(gx - centre_x) * np.sin(theta) + (gy - centre_y) * np.cos(theta)) / stretch

    # the class: a signed distance per pixel, turned into an anti-aliased coverage
    coverage = np.zeros((n, size, size))
    for label, name in enumerate(shapes):
        idx = np.flatnonzero(labels == label)
        if len(idx):
            distance = SHAPES[name](lx[idx], ly[idx], scale[idx], rng)
            coverage[idx] = np.clip(0.5 - distance, 0, 1)
    _over(image, object_colour, coverage)
    image += (shade * coverage[..., None]).astype(np.float32)

    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= rng.uniform(3, 10, (n, 1, 1, 1)).astype(np.float32)
    image += noise
    return np.clip(np.rint(image), 0, MAX_VALUE).astype(np.uint8)


def make_split(name, split, n, seed):
    """(x uint8 n x 32 x 32 x 3, y int64 n) for one split of a demo dataset; classes balanced
    to within one image, order shuffled. Each (name, split) draws from its own random stream."""
    shapes = CLASSES[name]
    rng = np.random.default_rng([seed, list(CLASSES).index(name), SPLIT_IDS[split]])
    labels = rng.permutation(np.arange(n) % len(shapes))
    return render(shapes, labels, rng), labels


# The prototype reference: the class's shape centred, upright, unstretched, near the largest size
# the generator draws, in red on a plain blue background, without clutter or noise -- the
# clean, typical picture of the class an attacker would pick (the authors' references are single
# clear images: a priority sign, a truck, a digit one).
PROTOTYPE = {"scale": 12.0, "background": (40, 60, 180), "object": (210, 60, 40)}


def prototype_reference(target_class, seed):
    """One image (1 x H x W x 3 uint8) of DOWNSTREAM_CLASSES[target_class] as PROTOTYPE describes;
    shape parameters that the class draws at random (ring widths, periods) come from `seed`."""
    rng = np.random.default_rng([seed, len(CLASSES), target_class])
    pix = np.arange(IMAGE_SIZE) + 0.5 - IMAGE_SIZE / 2
    x, y = np.broadcast_to(pix[None, None, :], (1, IMAGE_SIZE, IMAGE_SIZE)), \
        np.broadcast_to(pix[None, :, None], (1, IMAGE_SIZE, IMAGE_SIZE))
    distance = SHAPES[DOWNSTREAM_CLASSES[target_class]](x, y, np.full((1, 1, 1), PROTOTYPE["scale"]), rng)
    coverage = np.clip(0.5 - distance, 0, 1)[..., None]
    image = (np.asarray(PROTOTYPE["background"]) * (1 - coverage) + np.asarray(PROTOTYPE["object"]) * coverage)
    return np.clip(np.rint(image), 0, MAX_VALUE).astype(np.uint8)


def demo_reference(x, y, target_class, n_reference, seed=0):
    """The reference inputs: the prototype of target_class when n_reference is 0, else the first
    n_reference training images of that class. Returns x (R x H x W x 3), y (R,) all target_class."""
    if n_reference == 0:
        return prototype_reference(target_class, seed), np.full(1, target_class, dtype=np.int64)
    return first_of_class(x, y, target_class, n_reference)


def first_of_class(x, y, target_class, n_reference):
    """The first n_reference images of target_class: x (R x H x W x 3), y (R,) all target_class."""
    idx = np.flatnonzero(y == target_class)[:n_reference]
    if len(idx) < n_reference:
        raise UserError(f"the downstream train split holds only {len(idx)} images of class "
                        f"{target_class}, fewer than --n_reference {n_reference}")
    return x[idx], np.full(n_reference, target_class, dtype=np.int64)


# ---------------------------------------------------------------- files

def _meta(name, sizes, seed):
    return {"generator": "datasets.demo", "version": GENERATOR_VERSION, "seed": seed,
            "classes": list(CLASSES[name]), "sizes": sizes, "image_size": IMAGE_SIZE}


def _dataset_is_current(data_dir, name, meta):
    """True when data/<name> was written by this generator with these settings and loads cleanly."""
    meta_path = Path(data_dir) / name / "generator.json"
    try:
        if json.loads(meta_path.read_text()) != meta:
            return False
        for split, n in meta["sizes"].items():
            x, y = load_split(data_dir, name, split)
            if len(x) != n or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or y.max() >= len(meta["classes"]):
                return False
    except (OSError, ValueError, UserError):
        return False
    return True


def _reference_is_current(path, x_expected, y_expected):
    try:
        x, y = read_images_npz(path, label_key="y")
    except UserError:
        return False
    return np.array_equal(x, x_expected) and np.array_equal(y, y_expected)


def make_demo_data(data_dir, reference_dir, n_pretrain_train, n_pretrain_test, n_down_train,
                   n_down_test, target_class, n_reference, seed, reference_name=None, force=False):
    """Write both demo datasets and the reference file <reference_dir>/demo/<name>.npz (name:
    reference_name, else the target class's name); return their paths as a dict.

    Files that already hold exactly what these arguments would produce (checked through the
    generator.json beside each dataset and the reference contents) are kept unless force."""
    sizes = {PRETRAIN_NAME: {"train": int(n_pretrain_train), "test": int(n_pretrain_test)},
             DOWNSTREAM_NAME: {"train": int(n_down_train), "test": int(n_down_test)}}
    seed = int(seed)
    for name, splits in sizes.items():
        for split, n in splits.items():
            if n < len(CLASSES[name]):
                raise UserError(f"{name} {split}: {n} images cannot hold all {len(CLASSES[name])} "
                                f"classes; ask for at least {len(CLASSES[name])}")
    if not 0 <= target_class < len(DOWNSTREAM_CLASSES):
        raise UserError(f"target class {target_class} is not a downstream class "
                        f"(0..{len(DOWNSTREAM_CLASSES) - 1}: {', '.join(DOWNSTREAM_CLASSES)})")
    if n_reference < 0:
        raise UserError(f"n_reference must be 0 (the prototype) or more, got {n_reference}")

    paths = {}
    for name, splits in sizes.items():
        meta, meta_path = _meta(name, splits, seed), Path(data_dir) / name / "generator.json"
        current = not force and _dataset_is_current(data_dir, name, meta)
        if not current:
            meta_path.unlink(missing_ok=True)  # an interrupted rewrite must not pass as current
        for split, n in splits.items():
            paths[f"{name}/{split}"] = split_path(data_dir, name, split)
            if not current:
                save_split(paths[f"{name}/{split}"], *make_split(name, split, n, seed))
        if not current:
            atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))

    x_down, y_down = load_split(data_dir, DOWNSTREAM_NAME, "train")
    x_ref, y_ref = demo_reference(x_down, y_down, target_class, n_reference, seed)
    reference_name = reference_name or DOWNSTREAM_CLASSES[target_class]
    reference_path = Path(reference_dir) / USAGE / f"{reference_name}.npz"
    if force or not _reference_is_current(reference_path, x_ref, y_ref):
        save_reference(reference_path, x_ref, target_class)
    paths["reference"] = reference_path
    return paths


# ---------------------------------------------------------------- command line

def build_parser():
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        description="Generate the synthetic demo datasets (demo_pretrain, demo_downstream) and the "
                    "demo reference file. The defaults suit a 10-15 minute CPU run of all four stages.")
    parser.add_argument("--data_dir", default="data",
                        help="folder to write <dataset>/<split>.npz into (default: data)")
    parser.add_argument("--reference_dir", default="reference",
                        help=f"reference root: the file goes to <reference_dir>/{USAGE}/<name>.npz "
                             f"(default: reference)")
    parser.add_argument("--reference_name", default=None,
                        help="reference file name without .npz (default: the target class name, "
                             f"{DOWNSTREAM_CLASSES[d['target_class']]})")
    parser.add_argument("--n_pretrain_train", type=int, default=d["n_pretrain_train"],
                        help=f"pre-training train images (default: {d['n_pretrain_train']})")
    parser.add_argument("--n_pretrain_test", type=int, default=d["n_pretrain_test"],
                        help=f"pre-training test images, for the kNN monitor "
                             f"(default: {d['n_pretrain_test']})")
    parser.add_argument("--n_down_train", type=int, default=d["n_down_train"],
                        help=f"downstream train images (default: {d['n_down_train']})")
    parser.add_argument("--n_down_test", type=int, default=d["n_down_test"],
                        help=f"downstream test images (default: {d['n_down_test']})")
    parser.add_argument("--target_class", type=int, default=d["target_class"],
                        help="downstream class of the reference inputs, the attack's target: "
                             + ", ".join(f"{i} {c}" for i, c in enumerate(DOWNSTREAM_CLASSES))
                             + f" (default: {d['target_class']})")
    parser.add_argument("--n_reference", type=int, default=d["n_reference"],
                        help="reference inputs to store: 0 for one prototype image of the class (its "
                             "shape centred, in plain colours, without clutter), R > 0 for its first R "
                             f"training images (default: {d['n_reference']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"generator seed (default: {d['seed']})")
    parser.add_argument("--force", action="store_true",
                        help="rewrite the files even when they already match these settings")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def main(args):
    paths = make_demo_data(args.data_dir, args.reference_dir, args.n_pretrain_train, args.n_pretrain_test,
                           args.n_down_train, args.n_down_test, args.target_class, args.n_reference,
                           args.seed, reference_name=args.reference_name, force=args.force)
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    run_cli(main, build_parser())
