"""Issue 12, reproduced through the stage scripts: every item refused with its one-line message and
exit code 2 (or the outcome it should have), as a user running the command would see it.

The stages run in this process through utils.cli.run_cli, the wrapper of their command lines, so
the exit code and the `error: ...` line are the ones a shell sees; a subprocess is used only where
a second process is the point (the lock) or the whole command line is (one flag error)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import MIMIC
import prepare_data
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
import utils.stage
from datasets import save_split
from datasets.trigger import save_trigger
from models import SimCLR
from utils import files

from stage_cli import bad, clean, cli, copy_run, error, evaluate

ROOT = Path(__file__).resolve().parent.parent












def read(path):
    return json.loads(Path(path).read_text())


def log_epochs(folder):
    return [json.loads(line)["epoch"] for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished stage-0 run: 2 epochs at batch 16, default --lr 1e-3; copy it with copy_run."""
    out = tmp_path_factory.mktemp("finished") / "clean"
    assert clean(tiny, out) == 0
    return out




@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A fresh width-4 encoder in our checkpoint layout (normalised as cifar10 by name)."""
    path = tmp_path_factory.mktemp("enc") / "enc.pth"
    torch.save({"state_dict": SimCLR(width=4).state_dict(), "arch": {"arch": "resnet18", "width": 4}}, path)
    return path


# ---------------------------------------------------------------- 1. resume mixes runs

def test_resume_refuses_changed_flags_and_another_stage_then_continues(tiny, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "clean")
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pth", "args.json", "log.jsonl")}

    assert clean(tiny, out, "--batch_size", "32", "--lr", "5e-2", "--epochs", "4", "--resume") == 2
    line = error(capsys)
    assert line.startswith(f"error: --resume: these flags differ from the run in {out}: ")
    assert "--lr 0.001 -> 0.05" in line and "--batch_size 16 -> 32" in line

    assert clean(tiny, out, "--width", "8", "--epochs", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "size mismatch" not in err
    assert f"these flags differ from the run in {out}: --width 4 -> 8;" in err

    assert cli(MIMIC, "--data_dir", tiny / "data", "--teacher", out / "model_2.pth", "--results_dir", out,
               "--ratio", "0.5", "--batch_size", "16", "--epochs", "4", "--device", "cpu", "--resume") == 2
    assert error(capsys) == (f"error: --resume: {out / 'checkpoint.pth'} was written by stage 'clean_encoder', "
                             f"not 'mimic'; use a new --results_dir")
    assert {name: (out / name).read_bytes() for name in before} == before      # refusals change nothing

    assert clean(tiny, out, "--epochs", "4", "--resume") == 0
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 2" in capsys.readouterr().out
    assert read(out / "results.json")["epochs"] == 4 and read(out / "results.json")["encoder"] == "model_4.pth"
    assert log_epochs(out) == [1, 2, 3, 4]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 4 and (out / "model_4.pth").is_file()


# ---------------------------------------------------------------- 2. saves

def test_lost_final_model_file_is_rebuilt_on_resume(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "clean")
    (out / "model_2.pth").unlink()
    assert clean(tiny, out, "--resume") == 0
    assert read(out / "results.json")["encoder"] == "model_2.pth"
    rebuilt = torch.load(out / "model_2.pth", weights_only=True)
    last = torch.load(out / "checkpoint.pth", weights_only=True)
    assert rebuilt["epoch"] == 2 and all(torch.equal(v, last["state_dict"][k]) for k, v in rebuilt["state_dict"].items())
    assert log_epochs(out) == [1, 2]


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_must_be_positive(tiny, tmp_path, epochs, capsys):
    assert clean(tiny, tmp_path / "c", "--epochs", epochs) == 2
    assert error(capsys).endswith(f"error: argument --epochs: must be a positive integer, got {epochs}")
    assert not (tmp_path / "c").exists()


def test_resume_with_fewer_epochs_than_trained(tiny, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "clean")
    assert clean(tiny, out, "--resume", "--epochs", "1") == 2
    assert error(capsys) == (f"error: --resume: {out} has trained 2 epochs already, more than --epochs 1; "
                             f"pass --epochs 2 or more")


def test_kill_between_model_file_and_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """Killed while checkpoint.pth of the last epoch is being written: the model file is already
    there, the previous checkpoint.pth is intact, and --resume finishes into an existing file."""
    real = utils.stage.save_checkpoint

    def killed_while_writing_last_checkpoint(path, obj):
        if Path(path).name == "checkpoint.pth" and obj["epoch"] == 2:
            def write(tmp):
                torch.save(obj, tmp)
                raise KeyboardInterrupt
            files.atomic_write(path, write)
        real(path, obj)

    monkeypatch.setattr(utils.stage, "save_checkpoint", killed_while_writing_last_checkpoint)
    out = tmp_path / "clean"
    assert clean(tiny, out) == 130
    assert "interrupted: the last finished epoch is in checkpoint.pth" in capsys.readouterr().err
    assert torch.load(out / "model_2.pth", weights_only=True)["epoch"] == 2
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not list(out.glob("*.tmp")) and not (out / "results.json").exists()
    first = torch.load(out / "model_2.pth", weights_only=True)["state_dict"]

    monkeypatch.undo()
    assert clean(tiny, out, "--resume") == 0
    assert read(out / "results.json")["encoder"] == "model_2.pth"
    again = torch.load(out / "model_2.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(v, again[k]) for k, v in first.items())      # epoch 2 redone bit for bit
    assert log_epochs(out) == [1, 2]


# ---------------------------------------------------------------- 3. a broken encoder is never kept or scored

def test_absurd_learning_rate_is_refused_at_parse_time(tiny, encoder, tmp_path, capsys):
    """--lr 1e38 used to train one step to finite weights with NaN features, then be scored."""
    assert bad(tiny, encoder, tmp_path / "bad", "--lr", "1e38") == 2
    assert "argument --lr: must be a finite number in (0, 10], got 1e38" in capsys.readouterr().err


def test_diverged_badencoder_is_not_saved(tiny, encoder, tmp_path, capsys, monkeypatch):
    """Finite weights whose features are NaN (here a frozen BatchNorm variance driven below 0 by
    the step) are caught by the probe pass before anything is saved."""
    backbones, freeze, step = [], train_badencoder.freeze_batchnorm, torch.optim.SGD.step

    def remember(backbone):
        backbones.append(backbone)
        freeze(backbone)

    def step_then_break(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        backbones[-1].f[1].running_var.fill_(-1.0)      # finite, but every feature becomes NaN
        return out
    monkeypatch.setattr(train_badencoder, "freeze_batchnorm", remember)
    monkeypatch.setattr(torch.optim.SGD, "step", step_then_break)
    out = tmp_path / "bad"
    assert bad(tiny, encoder, out, "--batch_size", "64") == 2     # one step, then the check
    assert error(capsys) == ("error: the badencoder encoder has non-finite features (NaN/inf) after training; it "
                             "was not saved as a result. Lower --lr and run again")
    assert not list(out.glob("model_*.pth"))
    assert not (out / "results.json").exists() and not (out / "checkpoint.pth").exists()


def test_encoder_with_nan_weights_is_not_scored(tiny, tmp_path, capsys):
    state = SimCLR(width=4).state_dict()
    state["f.f.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"state_dict": state, "arch": {"arch": "resnet18", "width": 4}}, path)
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    assert error(capsys) == (f"error: the encoder {path} gives non-finite features on the train images; it "
                             f"cannot be scored (a broken encoder is not a removed backdoor)")
    assert not (tmp_path / "eval/results.json").exists()


def test_diverged_downstream_classifier_stops(tiny, encoder, tmp_path, capsys, monkeypatch):
    # --lr is bounded at parse time, so the divergence is simulated: the loss turns NaN at its first step
    cross_entropy = downstream.F.cross_entropy
    monkeypatch.setattr(downstream.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    assert evaluate(tiny, encoder, tmp_path / "eval") == 2
    assert error(capsys) == ("error: the downstream classifier's loss became nan at epoch 1; stopped. "
                             "Lower --lr and run again")
    assert not (tmp_path / "eval/results.json").exists()


# ---------------------------------------------------------------- 4. checkpoint metadata first

def test_huge_claimed_width_is_one_line_from_stage_3(tiny, tmp_path, capsys):
    """Through the script; that nothing is built first is tests/test_encoder.py's no_build check."""
    path = tmp_path / "huge.pth"
    torch.save({"state_dict": SimCLR(width=4).state_dict(), "arch": {"arch": "resnet18", "width": 20000}}, path)
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    assert error(capsys) == f"error: {path}: width must be an integer from 1 to 1024, got 20000"


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b'{"state_dict": {"f.f.0.weight": [1, 2]}}', "not a PyTorch checkpoint"),
    (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
], ids=["empty", "json", "random"])
def test_files_that_are_no_checkpoint(tiny, tmp_path, content, message, capsys):
    path = tmp_path / "enc.pth"
    path.write_bytes(content)
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    line = error(capsys)
    assert line.startswith(f"error: cannot read checkpoint {path}: {message}")
    assert "code execution" not in line


# ---------------------------------------------------------------- 5. inputs

def write_dataset(data_dir, name, x, y):
    save_split(data_dir / name / "train.npz", x, y)
    save_split(data_dir / name / "test.npz", x, y)


def test_negative_label_empty_shadow_nan_trigger_and_tiny_images(tiny, encoder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    write_dataset(data, "negative", images, [0, 1, 2, 0, 1, 2, 0, -1])
    write_dataset(data, "empty", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, int))
    write_dataset(data, "pixels", rng.integers(0, 255, (8, 1, 1, 3), dtype=np.uint8), [0, 1] * 4)
    t = np.zeros((1, 32, 32, 3), np.float32)
    t[0, 0, 0, 0] = np.nan
    save_trigger(tmp_path / "nan_trigger.npz", t, np.ones_like(t))

    def stage3(*extra):
        return evaluate(tiny, encoder, tmp_path / "eval", "--data_dir", data, "--overwrite", *extra)

    assert stage3("--dataset", "negative") == 2
    assert error(capsys) == (f"error: {data / 'negative/train.npz'}: labels must be non-negative class indices, "
                             f"found -1")
    assert stage3("--dataset", "pixels") == 2
    assert error(capsys) == (f"error: {data / 'pixels/train.npz'}: images are 1x1 pixels; the encoder needs at "
                             f"least 8x8 (it downsamples them 8 times)")
    assert stage3("--trigger_file", tmp_path / "nan_trigger.npz") == 2
    assert error(capsys) == f"error: {tmp_path / 'nan_trigger.npz'}: t holds NaN or infinite values"
    assert bad(tiny, encoder, tmp_path / "bad", "--data_dir", data, "--shadow_dataset", "empty") == 2
    assert error(capsys) == f"error: {data / 'empty/train.npz'} holds no images; a split needs at least one"


def test_mi_holdout_too_large_for_a_tiny_subset(tiny, encoder, tmp_path, capsys):
    """4 MI images with 20% held out leave 1 to evaluate on: one line, before any training."""
    out = tmp_path / "mimic"
    assert cli(MIMIC, "--data_dir", tiny / "data", "--teacher", encoder, "--results_dir", out, "--ratio", "0.0625",
               "--batch_size", "4", "--epochs", "1", "--mi_epochs", "1", "--device", "cpu") == 2
    assert error(capsys) == ("error: --mi_holdout: holdout 0.2 of 4 samples leaves fewer than 2 to train or to "
                             "evaluate on: the MI images are 4 (0.0625 of cifar10); raise --ratio or pass "
                             "--mi_holdout 0")
    assert not (out / "checkpoint.pth").exists() and not (out / "mi.json").exists()


REQUIRED = {train_clean_encoder: [], train_badencoder: ["--pretrained_encoder", "e.pth"],
            MIMIC: ["--teacher", "e.pth"], downstream: ["--encoder", "e.pth"]}


@pytest.mark.parametrize("module, flag, value, message", [
    (train_clean_encoder, "--save_freq", "0", "a positive integer"),
    (train_clean_encoder, "--batch_size", "0", "a positive integer"),
    (train_clean_encoder, "--lr", "nan", "a finite number in (0, 10]"),
    (train_clean_encoder, "--weight_decay", "nan", "a finite number >= 0"),
    (train_clean_encoder, "--width", "0", "an integer from 1 to 1024"),
    (train_clean_encoder, "--seed", "-1", "an integer from 0 to 4294967295"),
    (train_clean_encoder, "--num_workers", "-1", "a non-negative integer"),
    (train_clean_encoder, "--knn_k", "0", "a positive integer"),
    (train_badencoder, "--momentum", "-1", "a finite number in [0, 1)"),
    (MIMIC, "--mi_lr", "nan", "a finite number in (0, 10]"),
    (MIMIC, "--mi_epochs", "0", "a positive integer"),
    (MIMIC, "--mi_average_last", "0", "a positive integer"),
    (downstream, "--nn_epochs", "0", "a positive integer"),
    (downstream, "--hidden_size_1", "0", "an integer from 1 to 65536"),
])
def test_bad_flag_values_are_refused_at_parse_time(module, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.get_parser().parse_args([*REQUIRED[module], f"{flag}={value}", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # argparse names a flag with its aliases: argument --knn_k/--knn-k
    assert re.fullmatch(rf".*: error: argument {flag}(/[-\w]+)*: must be {re.escape(message)}, got {value}",
                        err.strip().splitlines()[-1])


def test_bad_flag_on_the_real_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "train_badencoder.py", "--pretrained_encoder", "e.pth", "--momentum=-1",
                           "--results_dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("train_badencoder.py: error: argument --momentum: must be a "
                                                    "finite number in [0, 1), got -1")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- 6. two writers

def test_second_writer_is_refused_until_the_first_dies(tiny, tmp_path, capsys):
    out = tmp_path / "clean"
    out.mkdir()
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.lock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert clean(tiny, out, "--epochs", "1") == 2
        line = error(capsys)
        assert line.startswith(f"error: {out} is being written by process {holder.pid} (started ")
        assert line.endswith("); wait for it to finish, or use another --results_dir")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]           # nothing written
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert clean(tiny, out, "--epochs", "1") == 0
    assert f"note: took over the stale lock of process {holder.pid} in {out}" in capsys.readouterr().err
    assert read(out / "results.json")["encoder"] == "model_1.pth"


# ---------------------------------------------------------------- 7. smaller items

def test_stale_temporary_is_removed_at_start(tiny, tmp_path):
    out = tmp_path / "clean"
    out.mkdir()
    (out / ".model_3.pth.abcdefgh.tmp").write_bytes(b"half a checkpoint")
    assert clean(tiny, out, "--epochs", "1") == 0
    assert not (out / ".model_3.pth.abcdefgh.tmp").exists() and (out / "model_1.pth").is_file()


def test_overwrite_removes_the_old_runs_model_files(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "clean")
    assert clean(tiny, out, "--epochs", "1", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_1.pth"]
    assert log_epochs(out) == [1] and read(out / "results.json")["epochs"] == 1


def test_partial_last_log_line_does_not_break_resume(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path / "clean")
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "lo')                    # killed while writing epoch 3's row
    assert clean(tiny, out, "--epochs", "3", "--resume") == 0
    assert log_epochs(out) == [1, 2, 3]
    assert [r.split(",")[0] for r in (out / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_reference_name_with_folders_is_refused(tiny, tmp_path, capsys):
    code = cli(prepare_data, "--make_reference", "cifar10", "1", "../../../tmp/x", "--out", tiny / "data",
               "--reference_dir", tmp_path / "reference")
    assert code == 2
    assert error(capsys) == ("error: the reference name must be a plain file name without folders, got "
                             "'../../../tmp/x'")
    assert not (tmp_path / "reference").exists()
