"""The validation layer: flags refused at parse time, bad files and checkpoints refused with one
line before anything is built, non-finite models never kept, one writer per results folder."""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models.encoder
import train_clean_encoder
from datasets.trigger import make_square_trigger
from models import SimCLR, encoder_checkpoint
from utils import checks
from utils.checks import (FREE_ON_RESUME, check_encoder_checkpoint, check_finite_encoder,
                          check_finite_features, check_finite_loss, check_labels, check_reference_labels,
                          check_split, check_stage, check_trigger, refuse_resume_conflicts,
                          remove_stale_temporaries, resume_conflicts)
from utils.errors import UserError
from utils.files import load_checkpoint, save_checkpoint, save_json
from utils.lock import RunLock

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- flags

def flag_parser():
    parser = argparse.ArgumentParser(prog="stage")
    parser.add_argument("--lr", type=checks.positive_float)
    parser.add_argument("--weight_decay", type=checks.nonnegative_float)
    parser.add_argument("--shift", type=checks.finite_float)
    parser.add_argument("--batch_size", type=checks.positive_int)
    parser.add_argument("--knn_freq", type=checks.nonnegative_int)
    parser.add_argument("--width", type=checks.positive_int)
    parser.add_argument("--seed", type=checks.seed_int)
    parser.add_argument("--ratio", type=checks.fraction)
    parser.add_argument("--momentum", type=checks.unit_interval)
    parser.add_argument("--knn_k", type=checks.int_at_least(2))
    parser.add_argument("--scale", type=checks.float_in(0, 10, hi_open=True))
    return parser


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--lr", "-0.1"], "argument --lr: must be a finite number > 0, got -0.1"),
    (["--lr", "fast"], "argument --lr: must be a finite number > 0, got fast"),
    (["--weight_decay=-1e-6"], "argument --weight_decay: must be a finite number >= 0, got -1e-6"),
    (["--shift", "1e400"], "argument --shift: must be a finite number, got 1e400"),
    (["--shift=-inf"], "argument --shift: must be a finite number, got -inf"),
    (["--batch_size", "0"], "argument --batch_size: must be a positive integer, got 0"),
    (["--batch_size", "1e38"], "argument --batch_size: must be a positive integer, got 1e38"),
    (["--knn_freq", "-1"], "argument --knn_freq: must be a non-negative integer, got -1"),
    (["--width", "8.5"], "argument --width: must be a positive integer, got 8.5"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
    (["--seed", "4294967296"], "argument --seed: must be an integer from 0 to 4294967295, got 4294967296"),
    (["--ratio", "0"], "argument --ratio: must be a finite number in (0, 1], got 0"),
    (["--ratio", "1.5"], "argument --ratio: must be a finite number in (0, 1], got 1.5"),
    (["--momentum", "1"], "argument --momentum: must be a finite number in [0, 1), got 1"),
    (["--momentum", "nan"], "argument --momentum: must be a finite number in [0, 1), got nan"),
    (["--knn_k", "1"], "argument --knn_k: must be an integer >= 2, got 1"),
    (["--scale", "10"], "argument --scale: must be a finite number in [0, 10), got 10"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flag_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: stage")
    assert err[-1] == f"stage: error: {message}"


def test_good_flags_parse_to_numbers():
    args = flag_parser().parse_args(["--lr", "1e-3", "--weight_decay", "0", "--shift", "-2.5", "--batch_size", "1",
                                     "--knn_freq", "0", "--seed", "4294967295", "--ratio", "1", "--momentum", "0",
                                     "--knn_k", "2", "--scale", "0", "--width", " 8"])
    assert (args.lr, args.weight_decay, args.shift, args.batch_size, args.knn_freq, args.seed) == \
           (1e-3, 0.0, -2.5, 1, 0, 2 ** 32 - 1)
    assert (args.ratio, args.momentum, args.knn_k, args.scale, args.width) == (1.0, 0.0, 2, 0.0, 8)
    assert isinstance(args.batch_size, int) and isinstance(args.lr, float)


# ---------------------------------------------------------------- data files

def test_labels():
    check_labels(np.array([0, 9, 3]), "d/train.npz")
    with pytest.raises(UserError, match=r"^d/train.npz: labels must be non-negative class indices, found -1$"):
        check_labels(np.array([0, -1]), "d/train.npz")
    with pytest.raises(UserError) as err:
        check_labels(np.array([0, 10 ** 12]), "d/train.npz")
    assert str(err.value) == ("d/train.npz: label 1000000000000 is not a class index (more than 100000 "
                              "classes); labels must be 0..C-1")
    with pytest.raises(UserError, match=r"labels must be integers, got float64"):
        check_labels(np.array([0.0, 1.0]), "d/train.npz")


def test_split():
    y = np.zeros(2, dtype=np.int64)
    check_split(np.zeros((2, 8, 8, 3), np.uint8), y, "d/train.npz")
    with pytest.raises(UserError, match=r"^d/train.npz holds no images; a split needs at least one$"):
        check_split(np.zeros((0, 32, 32, 3), np.uint8), y[:0], "d/train.npz")
    with pytest.raises(UserError) as err:
        check_split(np.zeros((2, 1, 1, 3), np.uint8), y, "d/train.npz")
    assert str(err.value) == ("d/train.npz: images are 1x1 pixels; the encoder needs at least 8x8 "
                              "(it downsamples them 8 times)")
    with pytest.raises(UserError, match=r"images are 32x4 pixels"):
        check_split(np.zeros((2, 32, 4, 3), np.uint8), y, "d/train.npz")
    with pytest.raises(UserError, match=r"found -1"):
        check_split(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1]), "d/train.npz")


def test_trigger():
    t, tm = make_square_trigger(32, 21, 10)
    check_trigger(t, tm, "trigger/x.npz")
    with np.load(ROOT / "trigger/trigger_pt_white_21_10_ap_replace.npz") as npz:
        check_trigger(npz["t"], npz["tm"], "shipped")
    cases = [
        (np.where(tm == 0, np.nan, t), tm, "trigger/x.npz: t holds NaN or infinite values"),
        (t, np.where(tm == 0, np.inf, tm), "trigger/x.npz: tm holds NaN or infinite values"),
        (np.where(tm == 0, 300.0, t), tm, "trigger/x.npz: t must lie in [0, 255], found values from 0 to 300"),
        (t - 1, tm, "trigger/x.npz: t must lie in [0, 255], found values from -1 to 254"),
        (t, np.where(tm == 0, 0.5, tm), "trigger/x.npz: tm must hold only 0 and 1 (1 keeps the pixel), found 0.5"),
        (t[:0], tm[:0], "trigger/x.npz holds no trigger (K = 0); regenerate it with python -m datasets.make_triggers"),
        (t, tm[..., :2], "trigger/x.npz: t and tm must have the same shape, got (1, 32, 32, 3) and (1, 32, 32, 2)"),
    ]
    for bad_t, bad_tm, message in cases:
        with pytest.raises(UserError) as err:
            check_trigger(bad_t, bad_tm, "trigger/x.npz")
        assert str(err.value) == message


def test_reference_labels():
    assert check_reference_labels(np.array([3, 3, 3]), "ref.npz") == 3
    with pytest.raises(UserError) as err:
        check_reference_labels(np.array([1, 2, 1]), "ref.npz")
    assert str(err.value) == ("reference file ref.npz holds labels 1 and 2; every reference input must "
                              "have the target label")
    with pytest.raises(UserError, match=r"holds labels 0, 1 and 2;"):
        check_reference_labels(np.array([2, 1, 0]), "ref.npz")
    with pytest.raises(UserError, match=r"^reference file ref.npz holds label -1; the target label must be"):
        check_reference_labels(np.array([-1, -1]), "ref.npz")


# ---------------------------------------------------------------- encoder checkpoints

@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build an encoder fails the test: the checks must refuse before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(models.encoder, "build_encoder", refuse)
    monkeypatch.setattr(models.encoder, "SimCLR", refuse)


def small_ckpt(**arch):
    ckpt = encoder_checkpoint(SimCLR(width=4))
    ckpt["arch"].update(arch)
    return ckpt


def test_arch_names_match_models():
    assert checks.ENCODER_ARCHS == tuple(models.encoder.ARCHS)


def test_valid_checkpoints_give_their_config():
    ours = small_ckpt()
    assert check_encoder_checkpoint(ours, "a.pth") == {"arch": "resnet18", "width": 4, "proj_dim": 128}
    # BadEncoder's release layout: weights at the top level, DataParallel prefix, no arch entry
    released = {f"module.{k}": v for k, v in SimCLR("resnet34", width=2, proj_dim=16).state_dict().items()}
    assert check_encoder_checkpoint(released, "r.pth") == {"arch": "resnet34", "width": 2, "proj_dim": 16}
    wide50 = {"state_dict": SimCLR("resnet50", width=2).state_dict()}
    assert check_encoder_checkpoint(wide50, "r50.pth") == {"arch": "resnet50", "width": 2, "proj_dim": 128}


def test_huge_claimed_width_is_refused_fast_without_building(tmp_path, no_build):
    path = tmp_path / "huge.pth"
    save_checkpoint(path, small_ckpt(width=20000))
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        check_encoder_checkpoint(load_checkpoint(path), path)
    assert time.perf_counter() - t0 < 0.5
    assert str(err.value) == f"{path}: width must be an integer from 1 to 1024, got 20000"
    with pytest.raises(UserError, match=r"proj_dim must be an integer from 1 to 65536, got 1000000000$"):
        check_encoder_checkpoint(small_ckpt(proj_dim=10 ** 9), "p.pth")
    # no arch entry: the width read from the weights is bounded the same way
    stem = {"f.f.0.weight": torch.zeros(20000, 3, 3, 3)}
    with pytest.raises(UserError, match=r"^s.pth: width must be an integer from 1 to 1024, got 20000$"):
        check_encoder_checkpoint(stem, "s.pth")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(arch="resnet18"), "c.pth: its 'arch' entry must be a dict such as {'arch': 'resnet18', "
                                          "'width': 64, 'proj_dim': 128}, got a str"),
    (lambda c: c["arch"].update(arch="vit"), "c.pth: arch 'vit' is not one of resnet18, resnet34, resnet50"),
    (lambda c: c["arch"].update(arch=["resnet18"]), "c.pth: arch ['resnet18'] is not one of resnet18, resnet34, "
                                                    "resnet50"),
    (lambda c: c["arch"].update(width=-4), "c.pth: width must be an integer from 1 to 1024, got -4"),
    (lambda c: c["arch"].update(width=8.5), "c.pth: width must be an integer from 1 to 1024, got 8.5"),
    (lambda c: c["arch"].update(width="8"), "c.pth: width must be an integer from 1 to 1024, got '8'"),
    (lambda c: c["arch"].update(width=True), "c.pth: width must be an integer from 1 to 1024, got True"),
    (lambda c: c["arch"].update(width=8), "c.pth: arch says width 8 but f.f.0.weight has 4 channels"),
    (lambda c: c["arch"].update(proj_dim=64), "c.pth: arch says proj_dim 64 but g.3.weight has 128 rows"),
    (lambda c: c["arch"].update(arch="resnet50"), "c.pth: arch says resnet50 but the weights have the layout "
                                                  "of resnet18"),
    (lambda c: c["state_dict"].update({"g.3.bias": [0.0] * 128}),
     "c.pth: state_dict entry 'g.3.bias' is a list, not a tensor; this is not an encoder checkpoint"),
    (lambda c: c["state_dict"].pop("f.f.0.weight"),
     "c.pth has no SimCLR encoder weights (expected keys f.f.0.weight, ..., g.3.bias)"),
    (lambda c: c.update(state_dict=[1, 2]), "c.pth: its 'state_dict' is a list, not a dict of tensors"),
    (lambda c: c["state_dict"].update({"f.f.0.weight": torch.zeros(4, 3)}),
     "c.pth: f.f.0.weight has shape (4, 3); expected (width, 3, 3, 3)"),
])
def test_bad_checkpoints_are_refused_before_building(change, message, no_build):
    ckpt = small_ckpt()
    change(ckpt)
    with pytest.raises(UserError) as err:
        check_encoder_checkpoint(ckpt, "c.pth")
    assert str(err.value) == message


def test_non_dict_checkpoint(no_build):
    with pytest.raises(UserError) as err:
        check_encoder_checkpoint([1, 2], "l.pth")
    assert str(err.value) == "l.pth is not an encoder checkpoint (expected a dict with 'state_dict', got a list)"


# ---------------------------------------------------------------- resume

def test_stage_of_a_resumed_folder():
    sd = {"f.f.0.weight": torch.zeros(1)}
    assert check_stage({"state_dict": sd, "stage": "mimic"}, "out", "mimic") == "mimic"
    with pytest.raises(UserError) as err:
        check_stage({"state_dict": sd, "args": {}, "stage": "clean_encoder"}, "out/clean", "mimic")
    assert str(err.value) == ("--resume: out/clean was written by stage 'clean_encoder', not 'mimic'; "
                              "use a new --results_dir")
    # old checkpoints without 'stage': told apart by their keys
    assert check_stage({"state_dict": sd, "mi": [1.0]}, "o", "mimic") == "mimic"
    assert check_stage({"state_dict": sd, "target_label": 2}, "o", "badencoder") == "badencoder"
    assert check_stage({"state_dict": sd}, "o", "clean_encoder") == "clean_encoder"
    with pytest.raises(UserError, match=r"written by stage 'badencoder', not 'clean_encoder'"):
        check_stage({"state_dict": sd, "target_label": 2}, "o", "clean_encoder")
    with pytest.raises(UserError, match=r"^--resume: o is not a checkpoint written by this project"):
        check_stage({"x": 1}, "o", "mimic")


def test_resume_conflicts_name_the_flags_that_change_training():
    stored = {"lr": 0.001, "batch_size": 16, "epochs": 10, "device": "cpu", "amp": "off", "channels_last": "off",
              "results_dir": "a", "teacher": "t.pth", "old_flag": 1}
    new = {"lr": 0.05, "batch_size": 32, "epochs": 20, "device": "cuda", "amp": "on", "channels_last": "on",
           "results_dir": Path("b"), "teacher": Path("t.pth"), "new_flag": 2}
    conflicts = resume_conflicts(stored, new)
    assert conflicts == ["--lr 0.001 -> 0.05", "--batch_size 16 -> 32", "--amp off -> on"]
    assert resume_conflicts(stored, new, free=FREE_ON_RESUME + ("lr", "batch_size", "amp")) == []
    with pytest.raises(UserError) as err:
        refuse_resume_conflicts(conflicts, "out/run")
    assert str(err.value) == ("--resume: these flags differ from the run in out/run: --lr 0.001 -> 0.05, "
                              "--batch_size 16 -> 32, --amp off -> on; pass the original values, or start a new "
                              "--results_dir")
    refuse_resume_conflicts([], "out/run")


def test_resume_conflicts_through_args_json(tmp_path):
    parser = train_clean_encoder.get_parser()
    args = parser.parse_args(["--results_dir", str(tmp_path), "--width", "4"])
    save_json(tmp_path / "args.json", vars(args))
    stored = json.loads((tmp_path / "args.json").read_text())
    assert resume_conflicts(stored, vars(args)) == []
    more = parser.parse_args(["--results_dir", str(tmp_path), "--width", "4", "--epochs", "5", "--resume",
                              "--device", "cpu"])
    assert resume_conflicts(stored, vars(more)) == []
    other = parser.parse_args(["--results_dir", str(tmp_path), "--width", "8", "--lr", "0.05"])
    assert resume_conflicts(stored, vars(other)) == ["--width 4 -> 8", "--lr 0.001 -> 0.05"]


def test_stale_temporaries_are_removed(tmp_path):
    fd, tmp = tempfile.mkstemp(dir=tmp_path, prefix=".checkpoint.pth.", suffix=".tmp")   # as atomic_write
    os.close(fd)
    (tmp_path / ".log.jsonl.ab_12xyz.tmp").write_text("")
    keep = ["checkpoint.pth", ".lock", "notes.tmp", ".hidden.tmp", ".x.toolongname.tmp"]
    for name in keep:
        (tmp_path / name).write_text("")
    assert remove_stale_temporaries(tmp_path) == sorted([Path(tmp).name, ".log.jsonl.ab_12xyz.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ---------------------------------------------------------------- trained models

def test_finite_encoder_passes_and_keeps_modes():
    model = SimCLR(width=4).train()
    model.g.eval()
    check_finite_encoder(model, 32, torch.device("cpu"), "clean")
    assert model.training and model.f.training and not model.g.training and not model.g[1].training


def test_nan_weights_are_caught():
    model = SimCLR(width=4)
    with torch.no_grad():
        model.f.f[3][0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError) as err:
        check_finite_encoder(model, 32, torch.device("cpu"), "mimic")
    assert str(err.value) == ("the mimic encoder has non-finite weights (NaN/inf) after training; it was not "
                              "saved as a result. Lower --lr and run again")


def test_nan_features_from_finite_weights_are_caught():
    model = SimCLR(width=4).train()
    model.f.f[1].running_var.fill_(-1.0)       # finite, but sqrt(-1) in eval mode gives NaN features
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    with pytest.raises(UserError) as err:
        check_finite_encoder(model, (16, 24), torch.device("cpu"), "backdoored")
    assert str(err.value) == ("the backdoored encoder has non-finite features (NaN/inf) after training; it was "
                              "not saved as a result. Lower --lr and run again")
    assert model.training


def test_finite_features_and_loss():
    check_finite_features(torch.ones(3, 4), "the test set", "m.pth")
    for feats in (torch.tensor([[1.0, float("nan")]]), np.array([[np.inf]])):
        with pytest.raises(UserError) as err:
            check_finite_features(feats, "the triggered test set", "m.pth")
        assert str(err.value) == ("the encoder m.pth gives non-finite features on the triggered test set; it "
                                  "cannot be scored (a broken encoder is not a removed backdoor)")
    check_finite_loss(0.5, 1)
    with pytest.raises(UserError) as err:
        check_finite_loss(torch.tensor(float("inf")), 3)
    assert str(err.value) == ("the downstream classifier's loss became inf at epoch 3; stopped. Lower --lr "
                              "and run again")


# ---------------------------------------------------------------- lock

def write_lock(folder, **record):
    path = Path(folder) / ".lock"
    path.write_text(json.dumps(record))
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_lock_held_in_process(tmp_path):
    with RunLock(tmp_path) as lock:
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value) == (f"{tmp_path} is being written by process {os.getpid()} (started "
                                  f"{record['started']}); wait for it to finish, or use another --results_dir")
        assert lock.record == record
    assert not (tmp_path / ".lock").exists()


def test_lock_of_another_live_process_then_taken_over_when_it_dies(tmp_path, capsys):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.lock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value).startswith(f"{tmp_path} is being written by process {child.pid} (started ")
        assert str(err.value).endswith("); wait for it to finish, or use another --results_dir")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    lock = RunLock(tmp_path).acquire()
    assert capsys.readouterr().err == f"note: took over the stale lock of process {child.pid} in {tmp_path}\n"
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_corrupt_reused_and_foreign_locks(tmp_path, capsys):
    for text in ("", "not json", '{"pid": -1}'):
        (tmp_path / ".lock").write_text(text)
        os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
        RunLock(tmp_path).acquire().release()
        assert capsys.readouterr().err == (f"note: took over the stale lock of an unknown process (unreadable "
                                           f"lock file) in {tmp_path}\n")
    # our own pid, reused: the recorded process start time differs
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started="then", proc_start=-5)
    RunLock(tmp_path).acquire().release()
    assert f"took over the stale lock of process {os.getpid()}" in capsys.readouterr().err
    # another host cannot be checked from here: respected
    write_lock(tmp_path, pid=1, host="elsewhere", started="2024-01-01 00:00:00")
    with pytest.raises(UserError, match=r"being written by process 1 on elsewhere \(started 2024-01-01"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    path = write_lock(tmp_path, pid=1, host="elsewhere", started="now")
    lock.release()
    assert path.exists()
