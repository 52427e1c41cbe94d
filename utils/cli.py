"""The command line every stage shares: flag types, common flags, and the wrapper that turns
expected failures into one `error: ...` line and exit code 2.

Flags are checked when they are parsed (the `type=` callables below): argparse prints one usage
line and `error: argument --lr: must be ...` and exits 2.

`--protocol authors|ours` (add_protocol) sets every behaviour of a stage to the authors' code in
one flag: each stage script gives its table {dest: authors' value} once, and StageParser takes
those values as the defaults of that parse, so a flag given explicitly still wins.
"""
import argparse
import copy
import math
import os
import sys
import traceback

import torch.distributed as dist

from .distributed import get_rank, get_world_size
from .errors import UserError

SEED_LIMIT = 2 ** 32            # numpy's seeds are below 2**32


# ---------------------------------------------------------------- argparse types

def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _int_type(lo, hi, desc, name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value
    return _named(parse, name)


def int_at_least(n):
    """argparse type: an integer >= n."""
    return _int_type(n, None, f"an integer >= {n}", f"int_at_least_{n}")


def int_in(lo, hi):
    """argparse type: an integer from lo to hi, for sizes that allocate memory (a width, a hidden
    layer, a number of copies): an absurd value is refused here rather than by the allocator."""
    return _int_type(lo, hi, f"an integer from {lo} to {hi}", f"int_in_{lo}_{hi}")


# Upper bounds of sizes. MAX_WIDTH equals the largest width models.encoder accepts in a checkpoint
# (16x the paper's 64); hidden layers and copies per step far above any useful value.
MAX_WIDTH = 1024
MAX_HIDDEN = 65536
MAX_COPIES = 65536


positive_int = _int_type(1, None, "a positive integer", "positive_int")
nonnegative_int = _int_type(0, None, "a non-negative integer", "nonnegative_int")
seed_int = _int_type(0, SEED_LIMIT - 1, f"an integer from 0 to {SEED_LIMIT - 1}", "seed_int")


def _float_desc(lo, hi, lo_open, hi_open):
    if lo is None and hi is None:
        return "a finite number"
    if hi is None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def float_in(lo=None, hi=None, lo_open=False, hi_open=False, name=None):
    """argparse type: a finite float within [lo, hi] (None = unbounded; *_open excludes the end)."""
    desc = _float_desc(lo, hi, lo_open, hi_open)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value
    return _named(parse, name or "float_in")


finite_float = float_in(name="finite_float")
positive_float = float_in(0, lo_open=True, name="positive_float")
nonnegative_float = float_in(0, name="nonnegative_float")
fraction = float_in(0, 1, lo_open=True, name="fraction")             # e.g. --ratio
unit_interval = float_in(0, 1, hi_open=True, name="unit_interval")   # e.g. --momentum
# Learning rates: above ~3e37 Adam's step size overflows float32 into a traceback, and no useful
# rate is anywhere near 10, so larger values are refused at parse time.
learning_rate = float_in(0, 10, lo_open=True, name="learning_rate")


# The shared run flags (add_run_args) as the authors' code runs: float32, torch's default memory
# layout, cuDNN's deterministic algorithms. Each stage's --protocol table takes them from here.
AUTHORS_RUN = {"amp": "off", "channels_last": "off", "cudnn_deterministic": "on"}


def add_run_args(parser, seed, save_freq=None):
    """Flags every stage shares: where to run, where to write, how to restart."""
    group = parser.add_argument_group("run")
    group.add_argument("--device", default="auto",
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--seed", type=seed_int, default=seed, help=f"random seed (default: {seed})")
    group.add_argument("--data_dir", default="data",
                       help="folder holding <dataset>/<split>.npz (default: data)")
    group.add_argument("--num_workers", type=nonnegative_int, default=0,
                       help="DataLoader worker processes for the torchvision augmentation path; "
                            "the default batched augmentation runs on --device and needs none (default: 0)")
    group.add_argument("--amp", default="off", choices=["auto", "on", "off"],
                       help="bfloat16 autocast of the training forward passes (losses stay float32); "
                            "auto = on for CUDA, off for CPU; the authors' code runs in float32 "
                            "(default: off)")
    group.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                       help="channels-last memory format for the encoders; auto = on for CUDA, off for CPU; "
                            "the authors' code keeps torch's default layout (default: auto)")
    group.add_argument("--cudnn_deterministic", default="off", choices=["on", "off"],
                       help="cuDNN's deterministic convolution algorithms; the autotuner (benchmark mode) stays "
                            "off either way, and neither has any effect on CPU; the authors' code turns it on "
                            "(default: off)")
    if save_freq is not None:
        group.add_argument("--save_freq", type=positive_int, default=save_freq,
                           help=f"also keep model_<epoch>.pth every this many epochs; the last epoch "
                                f"is always saved (default: {save_freq})")
        group.add_argument("--resume", action="store_true",
                           help="continue the run in --results_dir from its checkpoint.pth "
                                "(model, optimiser, epoch and RNG states)")
    group.add_argument("--overwrite", action="store_true",
                       help="allow writing into a --results_dir that already holds a run")
    group.add_argument("--debug", action="store_true",
                       help="show full tracebacks instead of one-line error messages")
    return group


def add_distributed_args(group):
    """--sync_bn, for the stages that train BatchNorm layers under torchrun."""
    group.add_argument("--sync_bn", action="store_true",
                       help="under torchrun, compute BatchNorm statistics over the global batch "
                            "(SyncBatchNorm; CUDA only in PyTorch) instead of each process's own "
                            "--batch_size images (default: off)")


# ---------------------------------------------------------------- --protocol

PROTOCOLS = ("ours", "authors")


class StageParser(argparse.ArgumentParser):
    """An ArgumentParser that honours --protocol (see add_protocol) in every parse: parse_args,
    parse_known_args, and so run_cli and the tests' get_parser().parse_args([...]) alike."""

    authors = None          # {dest: the authors' value}, set by add_protocol

    def parse_known_args(self, args=None, namespace=None):
        if not self.authors:
            return super().parse_known_args(args, namespace)
        args = sys.argv[1:] if args is None else list(args)
        # A first parse reads --protocol exactly as the full parse does (abbreviations, "=" forms).
        chosen = super().parse_known_args(args, copy.copy(namespace))[0].protocol
        if chosen == "ours":
            return super().parse_known_args(args, namespace)
        # argparse sets a default only where the namespace has no value yet, and a flag on the
        # command line overwrites whatever is there: so the authors' values act as this parse's
        # defaults, and an explicit flag still wins.
        namespace = copy.copy(namespace) if namespace is not None else argparse.Namespace()
        for dest, value in self.authors.items():
            if not hasattr(namespace, dest):
                setattr(namespace, dest, copy.copy(value))
        return super().parse_known_args(args, namespace)


def shown(value):
    """A flag value as a user types it: on/off for switches, 0.2 for floats."""
    if value is None:
        return "unset (its default)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_protocol(parser, authors, what="every behaviour of this stage as in the authors' code"):
    """--protocol authors|ours on a StageParser, after all its flags: `authors` = {dest: value} is
    the stage's behaviour in the authors' code, the table defined once next to its parser; `what`
    says in --help what it covers. Every listed flag's help gains its authors' value; an unknown
    dest is a programming error."""
    if not isinstance(parser, StageParser):
        raise TypeError("add_protocol needs a utils.cli.StageParser")
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(authors) - set(actions))
    if unknown:
        raise ValueError(f"--protocol table names no flag of this parser: {', '.join(unknown)}")
    for dest, value in authors.items():
        action = actions[dest]
        note = f"--protocol authors: {shown(value)}"
        help_text = action.help or ""
        if help_text.endswith(")") and "(default:" in help_text:
            action.help = help_text[:-1] + f"; {note})"
        else:
            action.help = f"{help_text} ({note})".strip()
    settings = ", ".join(f"{actions[d].option_strings[0]} {shown(v)}" for d, v in authors.items())
    parser.add_argument("--protocol", default="ours", choices=PROTOCOLS,
                        help=f"authors: {what} ({settings}); "
                             "a flag given explicitly still wins. ours: this project's defaults, each "
                             "deviation listed in docs/fidelity.md (default: ours)")
    parser.authors = dict(authors)
    return parser


def run_cli(main, parser, argv=None):
    """Parse the arguments and run main(args); expected failures exit with one line on stderr."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MIMIC_DEBUG") == "1"
    try:
        return main(args)
    except UserError as err:
        if debug:
            traceback.print_exc()
        where = f"rank {get_rank()}: " if get_world_size() > 1 else ""
        print(f"{where}error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if hasattr(args, "resume"):
            print("\ninterrupted: the last finished epoch is in checkpoint.pth; continue with --resume",
                  file=sys.stderr)
        else:       # a stage without checkpoints (stage 3) starts over
            print("\ninterrupted: this stage keeps no checkpoint, so nothing was saved; run the command "
                  "again to start over", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def add_pretraining_split(group):
    """--pretraining_split, for the stages that train on the pre-training data."""
    group.add_argument("--pretraining_split", default="auto", choices=["auto", "train", "train_unlabeled"],
                       help="split the encoder trains on: auto = train_unlabeled for STL-10 (as the "
                            "authors; kNN monitor and MI estimation still read the labelled train.npz), "
                            "train otherwise (default: auto)")


def add_clean_subset(group):
    """--pretraining_dataset and --ratio: the defender's clean data, shared by MIMIC and the defences."""
    group.add_argument("--pretraining_dataset", default=None,
                       help="dataset the suspect encoder was pre-trained on: its train split holds the clean "
                            "subset, and it names the normalisation unless the encoder carries its own "
                            "(default: the encoder's own, else cifar10)")
    group.add_argument("--ratio", type=fraction, default=0.04,
                       help="clean subset = the first ratio*N images of the train split, 0 < ratio <= 1 "
                            "(default: 0.04, i.e. 2,000 CIFAR-10 images)")


def add_init_flag(group, what, choices):
    """--init of the stages that build a fresh encoder (stage 0's encoder, MIMIC's student);
    choices: models.encoder.INITS, the first the default (utils does not import models)."""
    group.add_argument("--init", default=choices[0], choices=choices,
                       help=f"initialisation of {what}: torchvision's (kaiming-normal fan_out convs, "
                            "BatchNorm 1/0; the authors') or PyTorch's default for every layer "
                            "(default: torchvision)")
