"""Run the stage scripts' command lines in this process at tiny size (width 4, batch 16, CPU), as
tests/test_validation.py and tests/test_integrity.py do; each returns the exit code."""
import shutil
from pathlib import Path

import MIMIC
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
from paper import TRIGGER as TRIGGER_FILE
from utils.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = str(ROOT / TRIGGER_FILE)


def cli(module, *argv):
    """Run a stage's command line in this process; return its exit code (0 when main returns)."""
    try:
        run_cli(module.main, module.get_parser(), [str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


def clean(tiny, out, *extra, epochs=2, data=None):
    return cli(train_clean_encoder, "--data_dir", data or tiny / "data", "--results_dir", out, "--width", "4",
               "--batch_size", "16", "--epochs", str(epochs), "--device", "cpu", "--knn_freq", "0", *extra)


def bad(tiny, encoder, out, *extra):
    return cli(train_badencoder, "--data_dir", tiny / "data", "--pretrained_encoder", encoder, "--results_dir", out,
               "--reference_file", tiny / "priority.npz", "--trigger_file", TRIGGER, "--batch_size", "16",
               "--epochs", "1", "--device", "cpu", *extra)


def mimic(tiny, teacher, out, *extra):
    return cli(MIMIC, "--data_dir", tiny / "data", "--teacher", teacher, "--results_dir", out, "--ratio", "0.5",
               "--batch_size", "16", "--epochs", "1", "--attention", "uniform", "--device", "cpu", *extra)


def evaluate(tiny, encoder, out, *extra, epochs=2):
    return cli(downstream, "--data_dir", tiny / "data", "--encoder", encoder, "--results_dir", out,
               "--reference_label", "1", "--trigger_file", TRIGGER, "--nn_epochs", str(epochs), "--batch_size", "16",
               "--device", "cpu", *extra)


def error(capsys):
    """The `error: ...` line the last command printed (its last stderr line)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def copy_run(src, dst):
    # .lock is this process's lock of the original folder, not a lock of the copy
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst
