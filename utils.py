"""Training utilities shared by the four stage scripts.

Seeding, device choice, output folders, atomic checkpoint I/O with weights-only
loading, per-epoch logs, and the command-line wrapper that turns expected
failures (bad paths, bad files, bad flags) into one-line messages.
"""
import csv
import json
import math
import os
import pickle
import random
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(Exception):
    """A failure caused by the input (paths, files, flags), reported without a traceback."""


# ---------------------------------------------------------------- command line

def add_run_args(parser, seed, save_freq=None):
    """Flags every stage shares: where to run, where to write, how to restart."""
    group = parser.add_argument_group("run")
    group.add_argument("--device", default="auto",
                       help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    group.add_argument("--data_dir", default="data",
                       help="folder holding <dataset>/<split>.npz (default: data)")
    group.add_argument("--num_workers", type=int, default=0,
                       help="DataLoader worker processes for the torchvision augmentation path; "
                            "the default batched augmentation runs on --device and needs none (default: 0)")
    group.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                       help="bfloat16 autocast of the training forward passes (losses stay float32); "
                            "auto = on for CUDA, off for CPU (default: auto)")
    group.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                       help="channels-last memory format for the encoders; auto = on for CUDA, off for CPU "
                            "(default: auto)")
    if save_freq is not None:
        group.add_argument("--save_freq", type=int, default=save_freq,
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
        print("\ninterrupted: the last finished epoch is in checkpoint.pth; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def print_run_header(args):
    """Print the git revision and the sorted arguments, as the first lines of every run."""
    print(f"git: {git_revision()}")
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))


def start_run(args, resume=False, distributed=False):
    """The opening of every stage: join the torchrun process group (if distributed and launched
    by torchrun), print the run header, make the results folder, pick the device and seed
    everything. Every process gets the same seed. Returns (results folder, device)."""
    if distributed:
        device = init_distributed(args.device)
    else:
        if launched_processes() > 1:
            raise UserError(f"{Path(sys.argv[0]).name} runs in one process; launch it with python, "
                            f"not torchrun")
        device = resolve_device(args.device)
    print_run_header(args)
    out_dir = prepare_output_dir(args.results_dir, resume, args.overwrite)
    barrier()           # every process has checked the folder before rank 0 writes into it
    set_seed(args.seed)
    return out_dir, device


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- device and seeds

def resolve_device(name):
    """Turn --device into a torch.device; 'auto' picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu")
    return device


# ---------------------------------------------------------------- several processes (torchrun)

def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """True in the process that prints, logs and writes files (rank 0, or the only process)."""
    return get_rank() == 0


def launched_processes():
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch(batch_size):
    """(images per step over all processes, how to say it): --batch_size is per process."""
    world = get_world_size()
    return batch_size * world, f"{batch_size} x {world} processes" if world > 1 else str(batch_size)


def init_distributed(device_name):
    """Join the process group that torchrun describes in the environment and return this
    process's device; without torchrun (or with one process) just resolve --device.

    CUDA processes use cuda:LOCAL_RANK and NCCL, CPU processes gloo. Processes other than rank 0
    print nothing (their errors still reach stderr).
    """
    if launched_processes() <= 1:
        return resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, "
                            f"not {device_name}")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(values):
    """The mean over all processes of a tensor (detached); the tensor itself with one process."""
    values = values.detach()
    if get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / get_world_size()


def gather_objects(obj):
    """A list with every process's obj, in rank order (just [obj] with one process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def distribute(model, device, sync_bn=False):
    """Wrap model in DistributedDataParallel under torchrun (optionally with SyncBatchNorm);
    return it unchanged in a single process. Build the optimiser on model before calling:
    the conversion to SyncBatchNorm keeps the same parameter tensors."""
    if get_world_size() == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU. "
                            "Without it each process normalises over its own --batch_size images")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def progress(iterable, desc, **kwargs):
    """A tqdm bar, shown in the main process only, refreshed at most once a second."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 1)
    return tqdm(iterable, desc=desc, disable=not is_main(), **kwargs)


def fast_paths(args, device):
    """(amp, channels_last) from --amp/--channels_last: 'auto' turns each on for CUDA only."""
    def on(value):
        return device.type == "cuda" if value == "auto" else value == "on"
    return on(args.amp), on(args.channels_last)


def autocast(device, enabled):
    """bfloat16 autocast on the device (no gradient scaling needed, unlike float16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """All RNG states as tensors and plain Python values, so a weights-only load restores them."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- output folder

def prepare_output_dir(path, resume=False, overwrite=False):
    """Create the results folder (with parents) and refuse to clobber an earlier run."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"cannot write to results folder {path}: {err.strerror or err}") from None
    has_run = (path / "args.json").exists() or (path / "checkpoint.pth").exists()
    if has_run and not (resume or overwrite):
        raise UserError(f"{path} already holds a run; pass --resume to continue it or --overwrite "
                        f"to replace it")
    if resume and not (path / "checkpoint.pth").exists():
        raise UserError(f"--resume: no checkpoint.pth in {path} to continue from")
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
    atomic_write(path, write)


def save_checkpoint(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """Load a checkpoint with weights only: tensors and plain containers, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        hint = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UserError(f"refusing to load {path}: it holds objects that need code execution to "
                        f"unpickle, which a weights-only load does not run ({hint or 'not weights'})"
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------- logs

class RunLog:
    """args.json at start, one JSON line and one CSV row per epoch, results.json at the end."""

    def __init__(self, out_dir, args, resume_epoch=None):
        self.dir = Path(out_dir)
        self.jsonl = self.dir / "log.jsonl"
        self.csv = self.dir / "log.csv"
        self.writes = is_main()             # under torchrun only rank 0 writes
        if not self.writes:
            return
        save_json(self.dir / "args.json", vars(args))
        if resume_epoch is None:
            for f in (self.jsonl, self.csv):
                f.unlink(missing_ok=True)
        else:
            self._truncate(resume_epoch)

    def _truncate(self, last_epoch):
        """On resume drop log lines of epochs after the checkpoint, which will be redone."""
        rows = [r for r in self.read() if r.get("epoch", 0) <= last_epoch]
        for f in (self.jsonl, self.csv):
            f.unlink(missing_ok=True)
        for row in rows:
            self.log(row, echo=False)

    def read(self):
        if not self.jsonl.exists():
            return []
        with open(self.jsonl) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def log(self, row, echo=True):
        """Append one epoch's row to log.jsonl and log.csv (and print it)."""
        if not self.writes:
            return
        if echo:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def results(self, results):
        if self.writes:
            save_json(self.dir / "results.json", results)


def check_finite(value, epoch, step, out_dir):
    """Stop on a NaN or infinite loss; the checkpoint of the previous epoch is left as it was."""
    if not math.isfinite(value):
        raise UserError(f"loss became {value} at epoch {epoch}, step {step}; stopped. The last good "
                        f"checkpoint is {Path(out_dir) / 'checkpoint.pth'} (lower --lr and --resume)")


# ---------------------------------------------------------------- training state

def resume_state(out_dir, model, optimizer):
    """Restore model, optimiser and RNG states from <out_dir>/checkpoint.pth; return its epoch."""
    ckpt = load_checkpoint(Path(out_dir) / "checkpoint.pth")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    print(f"resumed from {Path(out_dir) / 'checkpoint.pth'} at epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt


def save_epoch(out_dir, state, epoch, epochs, save_freq):
    """Write checkpoint.pth (for --resume) and, every save_freq epochs and at the last, model_<epoch>.pth.

    state: the checkpoint dict (state_dict, arch, optimizer, args, ...); epoch and RNG states are
    added here. Only rank 0 writes. Returns the path of the model file written this epoch, if any.
    """
    if not is_main():
        return None
    state = {**state, "epoch": epoch, "rng": rng_state()}
    save_checkpoint(Path(out_dir) / "checkpoint.pth", state)
    if epoch % save_freq == 0 or epoch == epochs:
        path = Path(out_dir) / f"model_{epoch}.pth"
        save_checkpoint(path, state)
        return path
    return None
