"""The opening and the epoch bookkeeping of every training stage: header, results folder,
resume, and the checkpoint files written each epoch."""
import atexit
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .device import resolve_device
from .distributed import barrier, init_distributed, is_main, launched_processes
from .errors import UserError
from .files import load_checkpoint, save_checkpoint
from .checks import (check_finite_encoder, check_stage, refuse_resume_conflicts, remove_stale_temporaries,
                     resume_conflicts)
from .lock import RunLock
from .logs import RunLog
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
    if is_main():
        hold_lock(out_dir)
        remove_stale_temporaries(out_dir)
        if args.overwrite and not resume:
            clear_run(out_dir)
    barrier()           # every process has checked the folder before rank 0 writes into it
    set_seed(args.seed)
    return out_dir, device


_LOCKS = []


def hold_lock(out_dir):
    """Take the results folder's lock for the rest of this process (one writer per folder). A
    process that runs a stage again in the same folder (as the tests do) first lets go of its own."""
    for lock in [lock for lock in _LOCKS if lock.folder.resolve() == Path(out_dir).resolve()]:
        lock.release()
        _LOCKS.remove(lock)
    lock = RunLock(out_dir).acquire()
    _LOCKS.append(lock)
    atexit.register(lock.release)


# What a run writes into its folder; --overwrite removes all of it before the new run starts, so
# no model file of the old run is left beside the new ones.
RUN_FILES = ("args.json", "log.jsonl", "log.csv", "checkpoint.pth", "results.json", "mi.json")


def clear_run(out_dir):
    for path in [*(Path(out_dir) / name for name in RUN_FILES), *Path(out_dir).glob("model_*.pth")]:
        path.unlink(missing_ok=True)


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


def resume_state(out_dir, model, optimizer, args=None, stage=None):
    """Restore model, optimiser and RNG states from <out_dir>/checkpoint.pth; return its epoch.

    With args and stage, the checkpoint must come from that stage and from the same training
    flags: only flags that do not change the training (utils.checks.FREE_ON_RESUME, e.g.
    --epochs) may differ, and --epochs may not fall below the epochs already trained.
    """
    path = Path(out_dir) / "checkpoint.pth"
    ckpt = load_checkpoint(path)
    if stage is not None:
        check_stage(ckpt, path, stage)
        refuse_resume_conflicts(resume_conflicts(ckpt.get("args") or {}, vars(args)), out_dir)
        if args.epochs < ckpt["epoch"]:
            raise UserError(f"--resume: {out_dir} has trained {ckpt['epoch']} epochs already, more than "
                            f"--epochs {args.epochs}; pass --epochs {ckpt['epoch']} or more")
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
    path = None
    # The model file first: once checkpoint.pth says an epoch is done, its model file exists.
    if epoch % save_freq == 0 or epoch == epochs:
        path = Path(out_dir) / f"model_{epoch}.pth"
        save_checkpoint(path, state)
    save_checkpoint(Path(out_dir) / "checkpoint.pth", state)
    return path


class TrainingRun:
    """What every training stage does around its own epochs: resume, one logged row and the
    checkpoint files per epoch, and results.json at the end.

        run = TrainingRun(out_dir, args, "mimic", model, optimizer, usage="cifar10")
        start, ckpt = run.resume()          # (0, None) unless --resume
        run.train(start, lambda epoch: {"loss": ...})
        run.finish(mi=...)

    The checkpoints hold the model's weights and constructor arguments (models.encoder_checkpoint),
    the optimiser, the arguments, and `meta` (e.g. the target label), which a stage may extend
    before training.
    """

    def __init__(self, out_dir, args, stage, model, optimizer, image_size, **meta):
        self.out_dir, self.args, self.stage = Path(out_dir), args, stage
        self.model, self.optimizer, self.meta = model, optimizer, meta
        self.image_size, self.device = image_size, next(model.parameters()).device
        self.log = None

    def resume(self):
        """Restore model, optimiser and RNG states under --resume; open the log. Returns (epoch, ckpt)."""
        start, ckpt = 0, None
        if self.args.resume:
            start, ckpt = resume_state(self.out_dir, self.model, self.optimizer, self.args, self.stage)
        self.log = RunLog(self.out_dir, self.args, resume_epoch=start if self.args.resume else None)
        return start, ckpt

    def checkpoint(self):
        from models import encoder_checkpoint      # models imports utils: import it where it is used
        return encoder_checkpoint(self.model, optimizer=self.optimizer.state_dict(), args=vars(self.args),
                                  stage=self.stage, **self.meta)

    def train(self, start, train_epoch):
        """Epochs start+1..--epochs: train_epoch(epoch) returns the epoch's measurements; each is
        logged with its time, then saved (checkpoint.pth, and model_<epoch>.pth by --save_freq).
        With --epochs 0 (a defence that only prunes) the model is saved as it is, as model_0.pth."""
        epochs, began = self.args.epochs, time.time()
        for epoch in range(start + 1, epochs + 1):
            t0 = time.time()
            row = {"epoch": epoch, **train_epoch(epoch)}
            row["seconds"] = round(time.time() - t0, 2)
            left = (time.time() - began) / (epoch - start) * (epochs - epoch)
            self.log.log(row, prefix=f"epoch {epoch}/{epochs}, {duration(left)} left: ")
            check_finite_encoder(self.model, self.image_size, self.device, self.stage)
            save_epoch(self.out_dir, self.checkpoint(), epoch, epochs, self.args.save_freq)
        if is_main() and not self.encoder_path.exists():
            # --epochs 0, or resumed from a checkpoint.pth of the last epoch whose model file was lost.
            check_finite_encoder(self.model, self.image_size, self.device, self.stage)
            save_checkpoint(self.encoder_path, {**self.checkpoint(), "epoch": epochs, "rng": rng_state()})

    @property
    def encoder_path(self):
        return self.out_dir / f"model_{self.args.epochs}.pth"

    def finish(self, **results):
        """Write results.json: the stage, the final epoch's row, the encoder file and the arguments."""
        rows = self.log.read()
        # The encoder is named relative to this folder, so a copied results folder names its own.
        self.log.results({"stage": self.stage, "epochs": self.args.epochs, **results,
                          "final": rows[-1] if rows else {}, "encoder": self.encoder_path.name,
                          "args": vars(self.args)})
        return self.encoder_path


def duration(seconds):
    """A short human reading of a duration: 45s, 12m05s, 3h20m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
