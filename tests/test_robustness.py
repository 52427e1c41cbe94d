"""Untrusted checkpoints, interrupted runs and bad input: safe, resumable, clear."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import MIMIC
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
from datasets import load_split, save_split
from models import SimCLR, load_encoder
from utils.errors import UserError
from utils.files import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = str(ROOT / "trigger/trigger_pt_white_21_10_ap_replace.npz")


def clean_args(tiny, out, *extra):
    return train_clean_encoder.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--results_dir", str(out), "--width", "4", "--batch_size", "16",
         "--epochs", "2", "--device", "cpu", "--knn_freq", "0", *map(str, extra)])


def mimic_args(tiny, teacher, out, *extra):
    return MIMIC.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--teacher", str(teacher), "--results_dir", str(out), "--ratio", "0.5",
         "--batch_size", "16", "--epochs", "2", "--mi_epochs", "2", "--device", "cpu", *map(str, extra)])


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def encoder(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "enc.pth"
    torch.save({"state_dict": SimCLR(width=4).state_dict(), "arch": {"arch": "resnet18", "width": 4}}, path)
    return path


# ---------------------------------------------------------------- untrusted checkpoints

class Exploit:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": SimCLR(width=4).state_dict(), "payload": Exploit(marker)}, evil)
    with pytest.raises(UserError, match=rf"refusing to load {evil}: it holds objects that need code execution"):
        load_encoder(evil)
    assert not marker.exists()


def test_cli_refuses_malicious_encoder_in_one_line(tiny, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": Exploit(marker)}, evil)
    proc = subprocess.run([sys.executable, "training_downstream_classifier.py", "--encoder", str(evil),
                           "--data_dir", str(tiny / "data"), "--reference_label", "1", "--device", "cpu",
                           "--results_dir", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: refusing to load {evil}")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_atomic_save_leaves_previous_checkpoint_when_write_fails(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "bad": Unpicklable()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]           # no temporary file left behind


# ---------------------------------------------------------------- resume and determinism

def test_resumed_clean_run_equals_uninterrupted_run(tiny, tmp_path):
    train_clean_encoder.main(clean_args(tiny, tmp_path / "full"))
    train_clean_encoder.main(clean_args(tiny, tmp_path / "cut", "--epochs", "1"))     # stopped after epoch 1
    train_clean_encoder.main(clean_args(tiny, tmp_path / "cut", "--resume"))
    assert_same_weights(weights(tmp_path / "full/model_2.pth"), weights(tmp_path / "cut/model_2.pth"))
    full = torch.load(tmp_path / "full/model_2.pth", weights_only=True)["optimizer"]["state"]
    cut = torch.load(tmp_path / "cut/model_2.pth", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(full[k]["exp_avg"], cut[k]["exp_avg"]) for k in full)
    epochs = [r.split(",")[0] for r in (tmp_path / "cut/log.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]


def test_resumed_mimic_and_badencoder_equal_uninterrupted(tiny, encoder, tmp_path):
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "full"))
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "cut", "--epochs", "1"))
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "cut", "--resume"))
    assert_same_weights(weights(tmp_path / "full/model_2.pth"), weights(tmp_path / "cut/model_2.pth"))

    def bad(out, *extra):
        return train_badencoder.get_parser().parse_args(
            ["--data_dir", str(tiny / "data"), "--pretrained_encoder", str(encoder), "--results_dir", str(out),
             "--reference_file", str(tiny / "priority.npz"), "--trigger_file", TRIGGER, "--batch_size", "16",
             "--epochs", "2", "--device", "cpu", *extra])
    train_badencoder.main(bad(tmp_path / "bfull"))
    train_badencoder.main(bad(tmp_path / "bcut", "--epochs", "1"))
    train_badencoder.main(bad(tmp_path / "bcut", "--resume"))
    assert_same_weights(weights(tmp_path / "bfull/model_2.pth"), weights(tmp_path / "bcut/model_2.pth"))


def test_same_seed_gives_bit_identical_checkpoints(tiny, tmp_path):
    train_clean_encoder.main(clean_args(tiny, tmp_path / "a"))
    train_clean_encoder.main(clean_args(tiny, tmp_path / "b"))
    assert_same_weights(weights(tmp_path / "a/model_2.pth"), weights(tmp_path / "b/model_2.pth"))
    train_clean_encoder.main(clean_args(tiny, tmp_path / "c", "--seed", "7"))
    assert not torch.equal(weights(tmp_path / "a/model_2.pth")["f.f.0.weight"],
                           weights(tmp_path / "c/model_2.pth")["f.f.0.weight"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real = train_clean_encoder.nt_xent
    calls = []

    def breaks_in_epoch_2(z1, z2, t):
        calls.append(1)
        loss = real(z1, z2, t)
        return loss * float("nan") if len(calls) > 4 else loss     # 4 steps per epoch

    monkeypatch.setattr(train_clean_encoder, "nt_xent", breaks_in_epoch_2)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"loss became nan at epoch 2, step 0; stopped\. The last good "
                                        r"checkpoint is .*checkpoint\.pth"):
        train_clean_encoder.main(clean_args(tiny, out))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- clear errors

def test_missing_dataset_names_path_and_command(tmp_path):
    with pytest.raises(UserError, match=rf"dataset file not found: {tmp_path}/cifar10/train.npz \(create it with: "
                                        rf"python prepare_data.py --dataset cifar10"):
        load_split(tmp_path, "cifar10", "train")


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 32, 32, 3), np.uint8)}, r"lacks key\(s\) y"),
    ({"x": np.zeros((2, 32, 32, 3), np.float32), "y": np.zeros(2, int)}, r"x must be uint8 .* got float32"),
    ({"x": np.zeros((2, 32, 32), np.uint8), "y": np.zeros(2, int)}, r"x must be uint8 of shape \(N, H, W, 3\)"),
    ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.zeros(3, int)}, r"y must be 2 integer labels"),
])
def test_malformed_npz_is_described(tmp_path, arrays, message):
    (tmp_path / "ds").mkdir()
    np.savez(tmp_path / "ds/train.npz", **arrays)
    with pytest.raises(UserError, match=message):
        load_split(tmp_path, "ds", "train")


def test_reference_label_outside_classes(tiny, encoder, tmp_path):
    args = downstream.get_parser().parse_args(
        ["--encoder", str(encoder), "--data_dir", str(tiny / "data"), "--reference_label", "5",
         "--results_dir", str(tmp_path / "e"), "--device", "cpu", "--trigger_file", TRIGGER])
    with pytest.raises(UserError, match=r"--reference_label 5 is outside the 5 classes of gtsrb \(0\.\.4\)"):
        downstream.main(args)


def test_trigger_size_mismatch_in_a_stage(tiny, encoder, tmp_path):
    args = downstream.get_parser().parse_args(
        ["--encoder", str(encoder), "--data_dir", str(tiny / "data"), "--reference_label", "1",
         "--results_dir", str(tmp_path / "e"), "--device", "cpu",
         "--trigger_file", str(ROOT / "trigger/trigger_pt_white_173_50_ap_replace.npz")])
    with pytest.raises(UserError, match="is 224x224 but the images are 32x32"):
        downstream.main(args)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "other.pth"
    sd = SimCLR(width=8).state_dict()
    torch.save({"state_dict": sd, "arch": {"arch": "resnet18", "width": 16}}, path)
    with pytest.raises(UserError, match=r"arch says width 16 but f\.f\.0\.weight has 8 channels"):
        load_encoder(path)
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="has no SimCLR encoder weights"):
        load_encoder(path)


@pytest.mark.parametrize("ratio", ["0", "-0.1", "1.5"])
def test_ratio_outside_unit_interval(tiny, encoder, tmp_path, ratio, capsys):
    with pytest.raises(SystemExit) as exit_:
        mimic_args(tiny, encoder, tmp_path / "m", "--ratio", ratio)
    assert exit_.value.code == 2
    assert f"argument --ratio: must be a finite number in (0, 1], got {ratio}" in capsys.readouterr().err


def test_clean_subset_smaller_than_a_batch(tiny, encoder, tmp_path):
    with pytest.raises(UserError, match=r"the clean subset \(6 images = 0.1 x 64\) is smaller than one batch "
                                        r"of 16, and incomplete batches are dropped"):
        MIMIC.main(mimic_args(tiny, encoder, tmp_path / "m", "--ratio", "0.1"))


def test_unwritable_output_folder(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=rf"cannot write to results folder {blocker}/run"):
        train_clean_encoder.main(clean_args(tiny, blocker / "run"))


def test_existing_run_is_not_overwritten_without_flag(tiny, tmp_path):
    out = tmp_path / "deep/nested/run"                              # parents are created
    train_clean_encoder.main(clean_args(tiny, out, "--epochs", "1"))
    before = (out / "model_1.pth").read_bytes()
    with pytest.raises(UserError, match="already holds a run; pass --resume to continue it or --overwrite"):
        train_clean_encoder.main(clean_args(tiny, out, "--epochs", "1"))
    assert (out / "model_1.pth").read_bytes() == before
    with pytest.raises(UserError, match="--resume: no checkpoint.pth in"):
        train_clean_encoder.main(clean_args(tiny, tmp_path / "fresh", "--resume"))


def test_one_line_error_without_traceback_and_debug_shows_it(tmp_path):
    cmd = [sys.executable, "MIMIC.py", "--teacher", str(tmp_path / "none.pth"), "--data_dir", str(tmp_path),
           "--results_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: checkpoint not found: {tmp_path}/none.pth\n"
    proc = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True)
    assert "Traceback" in proc.stderr and proc.returncode == 2


def test_npz_with_1d_labels_is_accepted(tmp_path):
    save_split(tmp_path / "d/train.npz", np.zeros((3, 32, 32, 3), np.uint8), [0, 1, 2])
    np.savez(tmp_path / "d/test.npz", x=np.zeros((3, 32, 32, 3), np.uint8), y=np.array([2, 1, 0]))
    assert load_split(tmp_path, "d", "test")[1].tolist() == [2, 1, 0]
    assert load_split(tmp_path, "d", "train")[1].tolist() == [0, 1, 2]
