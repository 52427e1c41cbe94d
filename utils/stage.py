"""The opening and the epoch bookkeeping of every training stage: header, results folder,
resume, and the checkpoint files written each epoch."""
import subprocess
import sys
import tempfile
from pathlib import Path

from .device import resolve_device
from .distributed import barrier, init_distributed, is_main, launched_processes
from .errors import UserError
from .files import load_checkpoint, save_checkpoint
from .seeding import rng_state, set_rng_state, set_seed


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


def print_run_header(args):
    """Print the git revision and the sorted arguments, as the first lines of every run."""
    print(f"git: {git_revision()}")
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
