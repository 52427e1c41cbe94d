"""The opening and the epoch bookkeeping of every training stage: header, results folder,
resume, and the checkpoint files written each epoch."""
import atexit
import numbers
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .device import resolve_device, set_cudnn
from .distributed import barrier, init_distributed, is_main, launched_processes
from .errors import UserError
from .files import first_line, load_checkpoint, remove_stale_temporaries, save_checkpoint
from .fingerprint import differences
from .lock import RunLock
from .logs import RunLog
from .records import RESULTS, Results
from .seeding import rng_state, set_rng_state, set_seed


def start_run(args, resume=False, distributed=False, inputs=None):
    """The opening of every stage: join the torchrun process group (if distributed and launched
    by torchrun), print the run header, make the results folder, pick the device and seed
    everything. Every process gets the same seed. inputs: the stage's input files {role: path}
    (its input_files(args)), which --overwrite must not delete. Returns (results folder, device)."""
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
            refuse_deleting_inputs(out_dir, inputs or {})
            clear_run(out_dir)
    barrier()           # every process has checked the folder before rank 0 writes into it
    set_cudnn(args.cudnn_deterministic == "on")
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


def run_files(out_dir):
    """The files of an earlier run in out_dir that --overwrite deletes."""
    return [*(Path(out_dir) / name for name in RUN_FILES), *sorted(Path(out_dir).glob("model_*.pth"))]


def clear_run(out_dir):
    for path in run_files(out_dir):
        path.unlink(missing_ok=True)


def refuse_deleting_inputs(out_dir, inputs):
    """--overwrite deletes the old run's files; refuse, before deleting any, if one is an input."""
    doomed = {path.resolve() for path in run_files(out_dir) if path.exists()}
    for role, path in inputs.items():
        if Path(path).exists() and Path(path).resolve() in doomed:
            raise UserError(f"--overwrite would delete {path}, the input {role} of this run, with the old run "
                            f"in {out_dir}; copy it out of the folder or use another --results_dir")


def check_batchnorm_batch(batch_size, flag="--batch_size"):
    """Stages that train BatchNorm layers need two images per batch: with one, each channel's batch
    variance is undefined (PyTorch refuses it)."""
    if batch_size < 2:
        raise UserError(f"{flag} {batch_size}: this stage trains BatchNorm layers, whose statistics need at "
                        f"least 2 images per batch; use {flag} 2 or more")


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


def infer_stage(ckpt):
    """The stage that wrote one of our checkpoints: its 'stage' key, else guessed from its keys."""
    if "stage" in ckpt:
        return ckpt["stage"]
    if "mi" in ckpt:
        return "mimic"
    return "badencoder" if "target_label" in ckpt else "clean_encoder"


def check_stage(ckpt, path, expected_stage):
    """--resume continues only a run of the same stage; returns the stage."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"--resume: {path} is not a checkpoint written by this project; use a new "
                        f"--results_dir")
    stage = infer_stage(ckpt)
    if stage != expected_stage:
        raise UserError(f"--resume: {path} was written by stage {stage!r}, not {expected_stage!r}; "
                        f"use a new --results_dir")
    return stage


def refuse_resume_differences(found, out_dir):
    """One line listing what differs between the stored run and the new command."""
    if not found:
        return
    flags = [d for d in found if d.startswith("--")]
    what = "flags" if len(flags) == len(found) else "inputs" if not flags else "inputs and flags"
    raise UserError(f"--resume: these {what} differ from the run in {out_dir}: {', '.join(found)}; "
                    f"pass the original values and files, or start a new --results_dir")


# Far above any run (the paper trains 1,000 epochs): a larger epoch in a checkpoint is damage, not progress.
MAX_EPOCH = 1_000_000


def _count(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_resume_checkpoint(ckpt, model, path):
    """checkpoint.pth is validated like any input before --resume restores from it: the weights fit
    the model (keys and shapes), the epoch is a count, optimiser and RNG states are there."""
    state_dict = ckpt["state_dict"]
    if not isinstance(state_dict, dict):
        raise UserError(f"--resume: {path}: its state_dict is a {type(state_dict).__name__}, not a dict of tensors")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k, v in expected.items() if k in state_dict and (
        not hasattr(state_dict[k], "shape") or tuple(state_dict[k].shape) != tuple(v.shape))]
    for label, keys in (("lacks the weights", missing), ("holds unknown weights", unexpected),
                        ("has weights of the wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            raise UserError(f"--resume: {path} {label} {', '.join(keys[:3])}{more}; it is not a checkpoint of "
                            f"this model: start a new --results_dir")
    if not _count(ckpt.get("epoch")):
        raise UserError(f"--resume: {path} gives epoch {ckpt.get('epoch')!r}, not a non-negative integer; "
                        f"the file is damaged: start a new --results_dir")
    if ckpt["epoch"] > MAX_EPOCH:
        raise UserError(f"--resume: {path} gives epoch {ckpt['epoch']}, more than any run trains (at most "
                        f"{MAX_EPOCH}); the file is damaged: start a new --results_dir")
    for key, what in (("optimizer", "optimiser"), ("rng", "random-generator")):
        if not isinstance(ckpt.get(key), dict):
            raise UserError(f"--resume: {path} holds no {what} state ('{key}'), so the run cannot continue "
                            f"exactly; start a new --results_dir")


def save_epoch(out_dir, state, epoch, epochs, save_freq, fingerprint=None):
    """Write checkpoint.pth (for --resume) and, every save_freq epochs and at the last, model_<epoch>.pth.

    state: the checkpoint dict (state_dict, arch, optimizer, args, ...); epoch and RNG states are
    added here. Only rank 0 writes. Returns the path of the model file written this epoch, if any.
    """
    if not is_main():
        return None
    state = {**state, "epoch": epoch, "rng": rng_state(), "fingerprint": fingerprint}
    path = None
    # The model file first: once checkpoint.pth says an epoch is done, its model file exists.
    if epoch % save_freq == 0 or epoch == epochs:
        path = Path(out_dir) / f"model_{epoch}.pth"
        save_checkpoint(path, state)
    save_checkpoint(Path(out_dir) / "checkpoint.pth", state)
    return path


class TrainingRun:
    """What every training stage does around its own epoch loop: resume, one logged row and the
    checkpoint files per epoch, and results.json at the end.

        run = TrainingRun(out_dir, args, "mimic")
        start, ckpt = run.resume(model, optimizer)      # (0, None) unless --resume
        for epoch in range(start + 1, args.epochs + 1):
            row = train_one_epoch(...)
            run.log_epoch(epoch, row)
            run.save(epoch, checkpoint())               # the stage's checkpoint dict
        run.finish(checkpoint(), knn_acc=...)

    A checkpoint dict holds the weights and the model's constructor arguments
    (models.encoder_checkpoint), the optimiser, the arguments and whatever the stage adds.
    guard(), when given, runs before every model file is written and stops the run (UserError)
    if the model must not be kept, e.g. models.health.check_finite_encoder. fingerprint: the run's
    utils.fingerprint, stored in every checkpoint and in results.json; --resume continues only a
    run with the same one.
    """

    def __init__(self, out_dir, args, stage, guard=None, fingerprint=None):
        self.out_dir, self.args, self.stage, self.guard = Path(out_dir), args, stage, guard
        self.fingerprint = fingerprint
        self.log, self.start, self.began = None, 0, None

    def resume(self, model, optimizer):
        """Under --resume restore model, optimiser and RNG states from checkpoint.pth, which must
        come from this stage, be a sound checkpoint of this model and carry the same fingerprint:
        flags and input files (utils.fingerprint.differences; --epochs may differ but not fall
        below the epochs already trained). Opens the log either way.
        Returns (epoch reached, checkpoint dict or None)."""
        ckpt = None
        if self.args.resume:
            path = self.out_dir / "checkpoint.pth"
            ckpt = load_checkpoint(path)
            check_stage(ckpt, path, self.stage)
            if self.fingerprint is not None:
                recorded = ckpt.get("fingerprint")
                if not isinstance(recorded, dict):
                    raise UserError(f"--resume: {path} records no fingerprint of its flags and input files "
                                    f"(an older version wrote it), so it cannot be shown to be the same run; "
                                    f"start a new --results_dir")
                refuse_resume_differences(differences(recorded, self.fingerprint, ignore=("epochs",)),
                                          self.out_dir)
            check_resume_checkpoint(ckpt, model, path)
            if self.args.epochs < ckpt["epoch"]:
                raise UserError(f"--resume: {self.out_dir} has trained {ckpt['epoch']} epochs already, more "
                                f"than --epochs {self.args.epochs}; pass --epochs {ckpt['epoch']} or more")
            model.load_state_dict(ckpt["state_dict"])
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
                set_rng_state(ckpt["rng"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise UserError(f"--resume: {path} holds an optimiser or random-generator state that does not "
                                f"fit this run ({first_line(err)}); start a new --results_dir") from None
            self.start = ckpt["epoch"]
            print(f"resumed from {path} at epoch {self.start}")
        self.log = RunLog(self.out_dir, self.args, resume_epoch=self.start if self.args.resume else None)
        self.began = self.epoch_began = time.time()
        return self.start, ckpt

    def log_epoch(self, epoch, row):
        """Log one epoch's measurements (with the seconds since the last epoch was saved) and print
        them with the time left."""
        row = {"epoch": epoch, **row, "seconds": round(time.time() - self.epoch_began, 2)}
        epochs = self.args.epochs
        left = (time.time() - self.began) / (epoch - self.start) * (epochs - epoch)
        self.log.log(row, prefix=f"epoch {epoch}/{epochs}, {duration(left)} left: ")

    def save(self, epoch, state):
        """checkpoint.pth, and model_<epoch>.pth every --save_freq epochs and at the last."""
        if self.guard is not None:
            self.guard()
        save_epoch(self.out_dir, state, epoch, self.args.epochs, self.args.save_freq, self.fingerprint)
        self.epoch_began = time.time()

    @property
    def encoder_path(self):
        return self.out_dir / f"model_{self.args.epochs}.pth"

    def finish(self, state, **results):
        """Write the final model file if no epoch wrote it (--epochs 0, as a defence that only
        prunes; or a resume from a checkpoint.pth whose model file was lost), then results.json:
        the stage, the final epoch's row, the encoder file and the arguments. Returns the encoder path."""
        if is_main() and not self.encoder_path.exists():
            if self.guard is not None:
                self.guard()
            save_checkpoint(self.encoder_path, {**state, "epoch": self.args.epochs, "rng": rng_state(),
                                                "fingerprint": self.fingerprint})
        rows = self.log.read()
        if is_main():
            Results(stage=self.stage, args=vars(self.args), epochs=self.args.epochs, encoder=self.encoder_path.name,
                    final=rows[-1] if rows else {}, fingerprint=self.fingerprint,
                    extra=results).save(self.out_dir / RESULTS)
        return self.encoder_path


def duration(seconds):
    """A short human reading of a duration: 45s, 12m05s, 3h20m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
