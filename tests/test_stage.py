"""Resume bookkeeping of utils/stage.py: which stage wrote a folder, which flags may change."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import train_clean_encoder
from utils.errors import UserError
from utils.files import remove_stale_temporaries, save_json
from utils.stage import FREE_ON_RESUME, check_stage, refuse_resume_conflicts, resume_conflicts

ROOT = Path(__file__).resolve().parent.parent


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
