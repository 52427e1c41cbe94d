"""Write the datasets and reference inputs the four stages read (stage "-1": data preparation).

The paper's data, downloaded by torchvision (needs internet), and a check of its reference files:
    python prepare_data.py --dataset all --download --references
The same from files already downloaded, in the folder torchvision's dataset classes read:
    python prepare_data.py --dataset all --root /path/to/downloads --references
One dataset:
    python prepare_data.py --dataset gtsrb --root /path/to/downloads
A folder of class folders of images (any size and common format) as a dataset named "mine":
    python prepare_data.py --image_folder DIR --name mine --test_fraction 0.2
Only check the reference files of the published commands (the authors' released files, shipped in
reference/; never rewritten: a missing or altered one is restored with git checkout):
    python prepare_data.py --references
Another reference file, e.g. GTSRB class 14 (stop) -> reference/cifar10/stop.npz (the medoid
of the class, see --reference_pick):
    python prepare_data.py --make_reference gtsrb 14 stop --pretraining_dataset cifar10
CTRL's poisoned copy of CIFAR-10 (1% of the images, all of class 0, frequency trigger; docs/ctrl.md):
    python prepare_data.py --poison ctrl --poison_dataset cifar10 --target_label 0 --name cifar10_ctrl

Reads --root (layout in datasets/prepare.py) or --image_folder. Writes <out>/<name>/train.npz and
test.npz (stl10 also train_unlabeled.npz): x uint8 (N, 32, 32, 3), y (N, 1); normalization.json
beside train.npz (the per-channel mean and std of its pixels; not for cifar10 and stl10, whose
published values are fixed); and
<reference_dir>/<pretraining_dataset>/<name>.npz: x uint8 (R, 32, 32, 3), y (R,) for --make_reference.
Files that exist and validate are kept (--force rebuilds them, never the released reference files);
a summary table of what is on disk ends every run.
--poison writes <out>/<name>/train.npz (poisoned), test.npz (copied) and poison.json (datasets/poison.py).
"""
import argparse
import sys
from pathlib import Path

from datasets.frequency import CTRL_MAGNITUDE, CTRL_WINDOW
from datasets.poison import CTRL_POISON_RATIO, POISON_RECORD, ROUNDING, poison_ctrl
from datasets.prepare import (DEFAULT_REFERENCE_COUNT, DEFAULT_REFERENCE_PICK, DEFAULT_RESIZE_FILTER,
                              DEFAULT_TEST_FRACTION, MEDOID_POOL, MEDOID_SIZE, PAPER_DATASETS, PAPER_REFERENCES,
                              REFERENCE_PICKS, RESIZE_FILTERS, check_released_references, format_table,
                              make_reference, prepare_image_folder, prepare_paper_dataset, reference_path,
                              size_warnings)
from datasets.trigger import FrequencyTrigger
from utils.cli import finite_float, float_in, fraction, nonnegative_int, positive_int, run_cli, seed_int
from utils.errors import UserError

SPLIT_COLUMNS = ["dataset", "split", "images", "expected", "shape", "dtype", "labels", "status"]
REFERENCE_COLUMNS = ["file", "source", "label", "images", "status"]


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    src = parser.add_argument_group("the paper's datasets")
    src.add_argument("--dataset", nargs="+", default=[], choices=PAPER_DATASETS + ("all",),
                     help="datasets to convert; all = " + " ".join(PAPER_DATASETS) + " (default: none)")
    src.add_argument("--root", default="data/downloads",
                     help="folder torchvision's dataset classes read and download to: it holds "
                          "cifar-10-batches-py/, train_32x32.mat and test_32x32.mat, gtsrb/, "
                          "stl10_binary/ (default: data/downloads)")
    src.add_argument("--download", action="store_true",
                     help="let torchvision download missing files into --root; needs internet "
                          "(default: off, read what is there)")
    src.add_argument("--resize_filter", default=DEFAULT_RESIZE_FILTER, choices=sorted(RESIZE_FILTERS),
                     help="Pillow filter resizing GTSRB, STL-10 and image folders to 32x32; bicubic "
                          "is anti-aliased when shrinking and smooth when enlarging small GTSRB signs "
                          f"(default: {DEFAULT_RESIZE_FILTER})")

    folder = parser.add_argument_group("your own images")
    folder.add_argument("--image_folder", default=None,
                        help="folder of class folders (DIR/<class>/<image>, or DIR/train/<class>/ "
                             "and DIR/test/<class>/); labels 0..C-1 follow the sorted class names "
                             "(default: none)")
    folder.add_argument("--name", default=None,
                        help="dataset name for --image_folder, i.e. <out>/<name>/ (default: the "
                             "folder's name)")
    folder.add_argument("--test_fraction", type=float_in(0, 1, lo_open=True, hi_open=True, name="test_fraction"),
                        default=None,
                        help="share of each class put in the test split when DIR has no train/ and "
                             f"test/ sub-folders (default: {DEFAULT_TEST_FRACTION})")
    folder.add_argument("--seed", type=seed_int, default=0,
                        help="seed of the train/test split and of the image order (default: 0)")

    ref = parser.add_argument_group("reference inputs")
    ref.add_argument("--references", action="store_true",
                     help="check the reference files of the published commands, the authors' released "
                          "files shipped in <reference_dir>, against their published md5 (never "
                          "rewritten; a missing or altered one is restored with git checkout): "
                          + ", ".join(f"{u}/{n}.npz = {d} class {c}" for u, n, d, c in PAPER_REFERENCES)
                          + " (default: off)")
    ref.add_argument("--make_reference", nargs=3, metavar=("DATASET", "LABEL", "NAME"), default=None,
                     help="write <reference_dir>/<pretraining_dataset>/NAME.npz from class LABEL of the "
                          "prepared DATASET's train split, for other datasets or your own data "
                          "(default: none)")
    ref.add_argument("--reference_pick", default=DEFAULT_REFERENCE_PICK, choices=REFERENCE_PICKS,
                     help=f"which images of the class --make_reference takes: medoid = among the first "
                          f"{MEDOID_POOL} images of the class, the one with the smallest mean distance to "
                          f"the others on {MEDOID_SIZE}x{MEDOID_SIZE} grayscale thumbnails (a typical, "
                          "centred view, as the released files are; with --reference_count R the R most "
                          "central), deterministic, ties to the earlier image; first = the first images "
                          f"of the class in the train split (default: {DEFAULT_REFERENCE_PICK})")
    ref.add_argument("--reference_count", type=positive_int, default=DEFAULT_REFERENCE_COUNT,
                     help="reference images per file of --make_reference; the released files hold one "
                          f"(default: {DEFAULT_REFERENCE_COUNT})")
    ref.add_argument("--pretraining_dataset", "--encoder_usage", dest="pretraining_dataset", default="cifar10",
                     help="dataset of the encoders the reference is for: the folder of --make_reference "
                          "(default: cifar10)")
    ref.add_argument("--reference_dir", default="reference",
                     help="folder of <pretraining_dataset>/<name>.npz reference files (default: reference)")

    poison = parser.add_argument_group("a poisoned copy (CTRL's attack, docs/ctrl.md)")
    poison.add_argument("--poison", default=None, choices=["ctrl"],
                        help="write a poisoned copy of --poison_dataset named --name: ctrl triggers the first "
                             "round(--poison_ratio x N) images of --target_label in place with CTRL's frequency "
                             "trigger (default: none)")
    poison.add_argument("--poison_dataset", default=None, help="prepared dataset to copy (default: none)")
    poison.add_argument("--target_label", type=nonnegative_int, default=None,
                        help="the attacker's target class; every poisoned image is one of it (default: none)")
    poison.add_argument("--poison_ratio", type=fraction, default=CTRL_POISON_RATIO,
                        help=f"share of the whole train split poisoned, rounded to the nearest image, halves up "
                             f"(default: {CTRL_POISON_RATIO}, CTRL's)")
    poison.add_argument("--ctrl_magnitude", type=finite_float, default=CTRL_MAGNITUDE,
                        help=f"value added to each chosen DCT coefficient (default: {CTRL_MAGNITUDE:g})")
    poison.add_argument("--ctrl_window", type=positive_int, default=CTRL_WINDOW,
                        help=f"DCT window size; 32 = the whole 32x32 image (default: {CTRL_WINDOW})")

    out = parser.add_argument_group("output")
    out.add_argument("--out", "--data_dir", dest="out", default="data",
                     help="folder receiving <name>/<split>.npz; the stages read it as --data_dir "
                          "(default: data)")
    out.add_argument("--force", action="store_true",
                     help="rebuild files that already exist and validate (default: off, keep them)")
    out.add_argument("--debug", action="store_true",
                     help="show full tracebacks instead of one-line errors (default: off)")
    return parser


def main(args):
    if not (args.dataset or args.image_folder or args.references or args.make_reference or args.poison):
        raise UserError("nothing to do: pass --dataset, --image_folder, --references, --make_reference or "
                        "--poison (see --help)")
    if args.name and not (args.image_folder or args.poison):
        raise UserError("--name names the dataset made from --image_folder or --poison; pass one of them too")
    if args.poison and (args.image_folder or not (args.poison_dataset and args.name and args.target_label is not None)):
        raise UserError("--poison needs --poison_dataset, --name and --target_label (and no --image_folder)")
    for flag, folder in (("--out", args.out), ("--reference_dir", args.reference_dir)):
        if Path(folder).exists() and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder} is a file, not a folder; name a folder (it is created if missing)")
    names = PAPER_DATASETS if "all" in args.dataset else tuple(dict.fromkeys(args.dataset))

    rows = []
    for name in names:
        rows += prepare_paper_dataset(name, args.root, args.out, download=args.download,
                                      force=args.force, resize_filter=args.resize_filter)
    if args.image_folder:
        name = args.name or _folder_name(args.image_folder)
        rows += prepare_image_folder(args.image_folder, name, args.out, args.test_fraction, args.seed,
                                     args.force, args.resize_filter)

    references = []
    if args.references:
        references += check_released_references(args.reference_dir)
    if args.make_reference:
        dataset, label, name = args.make_reference
        try:
            label = int(label)
        except ValueError:
            raise UserError(f"--make_reference: LABEL must be an integer class, got {label!r}") from None
        references.append(make_reference(args.out, dataset, label,
                                         reference_path(args.reference_dir, args.pretraining_dataset, name),
                                         args.reference_count, args.force, args.reference_pick))

    if args.poison:
        record = poison_ctrl(args.out, args.poison_dataset, args.name, args.target_label, args.poison_ratio,
                             FrequencyTrigger(args.ctrl_magnitude, args.ctrl_window), args.force)
        print(f"{args.out}/{args.name}: {record['poisoned']} of {record['images']} {args.poison_dataset} train images "
              f"(class {args.target_label}) triggered by CTRL ({ROUNDING}); {record['status']}, indices in "
              f"{POISON_RECORD}")

    if rows:
        print(format_table(rows, SPLIT_COLUMNS))
        for row in rows:
            if row.get("normalization"):
                print(f"{row['dataset']} normalisation: {row['normalization']}")
    if references:
        print(format_table(references, REFERENCE_COLUMNS))
    for line in size_warnings(rows):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _folder_name(folder):
    name = Path(folder).resolve().name
    if not name:
        raise UserError(f"cannot name a dataset after {folder}; pass --name")
    return name


if __name__ == "__main__":
    run_cli(main, get_parser())
