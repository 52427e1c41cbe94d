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
from utils.fingerprint import differences, fingerprint, stage_fingerprint
from utils.stage import check_stage, refuse_resume_differences

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


def test_resume_differences_name_the_flags_that_change_training(tmp_path):
    stored = {"lr": 0.001, "batch_size": 16, "epochs": 10, "device": "cpu", "amp": "off", "channels_last": "off",
              "results_dir": "a", "teacher": "t.pth"}
    new = {"lr": 0.05, "batch_size": 32, "epochs": 20, "device": "cuda", "amp": "on", "channels_last": "on",
           "results_dir": Path("b"), "teacher": Path("t.pth")}
    found = differences(fingerprint("mimic", stored, {}), fingerprint("mimic", new, {}), ignore=("epochs",))
    assert found == ["--amp off -> on", "--batch_size 16 -> 32", "--lr 0.001 -> 0.05"]
    with pytest.raises(UserError) as err:
        refuse_resume_differences(found, "out/run")
    assert str(err.value) == ("--resume: these flags differ from the run in out/run: --amp off -> on, "
                              "--batch_size 16 -> 32, --lr 0.001 -> 0.05; pass the original values and files, "
                              "or start a new --results_dir")
    refuse_resume_differences([], "out/run")


def test_resume_fingerprint_through_args_json(tmp_path):
    """A fingerprint read back from JSON equals the one computed from the parsed arguments."""
    parser = train_clean_encoder.get_parser()
    args = parser.parse_args(["--results_dir", str(tmp_path), "--width", "4"])
    save_json(tmp_path / "fp.json", stage_fingerprint("clean_encoder", args, train_clean_encoder.input_files))
    stored = json.loads((tmp_path / "fp.json").read_text())
    again = stage_fingerprint("clean_encoder", args, train_clean_encoder.input_files)
    assert differences(stored, again) == []
    more = parser.parse_args(["--results_dir", str(tmp_path), "--width", "4", "--epochs", "5", "--resume",
                              "--device", "cpu"])
    assert differences(stored, stage_fingerprint("clean_encoder", more, train_clean_encoder.input_files),
                       ignore=("epochs",)) == []
    other = parser.parse_args(["--results_dir", str(tmp_path), "--width", "8", "--lr", "0.05"])
    assert differences(stored, stage_fingerprint("clean_encoder", other, train_clean_encoder.input_files)) == [
        "--lr 0.001 -> 0.05", "--width 4 -> 8"]


def test_stale_temporaries_are_removed(tmp_path):
    fd, tmp = tempfile.mkstemp(dir=tmp_path, prefix=".checkpoint.pth.", suffix=".tmp")   # as atomic_write
    os.close(fd)
    (tmp_path / ".log.jsonl.ab_12xyz.tmp").write_text("")
    keep = ["checkpoint.pth", ".lock", "notes.tmp", ".hidden.tmp", ".x.toolongname.tmp"]
    for name in keep:
        (tmp_path / name).write_text("")
    assert remove_stale_temporaries(tmp_path) == sorted([Path(tmp).name, ".log.jsonl.ab_12xyz.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
