"""Issue 27, "Reuse only what is provably the same", through the stage scripts at tiny size: run
fingerprints decide --resume, checkpoints carry a hash of their weights, a collapsed encoder is
neither kept nor scored, and every hostile input ends with one `error: ...` line and exit code 2.

The stages run in this process through utils.cli.run_cli, as in tests/test_validation.py."""
import errno
import functools
import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import MIMIC
import defenses
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
from models import SimCLR, encoder
from models.encoder import ARCHS, expected_shapes, load_encoder
from models.health import MIN_SPREAD, collapse_reason, feature_spread
from utils import files
from utils.errors import UserError
from utils.fingerprint import differences, file_hash, fingerprint
from utils.lock import RunLock

import stage_cli
from stage_cli import TRIGGER, bad, cli, copy_run, error, mimic

# One epoch everywhere: these tests need a finished run, not a trained one.
clean = functools.partial(stage_cli.clean, epochs=1)
evaluate = functools.partial(stage_cli.evaluate, epochs=1)

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))














def save_encoder(path, model, **extra):
    torch.save({"state_dict": model.state_dict(), "arch": dict(model.config), **extra}, path)
    return path


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    """A fresh width-4 encoder, saved without a weights hash (as BadEncoder's released files)."""
    torch.manual_seed(0)
    return save_encoder(tmp_path_factory.mktemp("enc") / "enc.pth", SimCLR(width=4))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished one-epoch stage-0 run."""
    out = tmp_path_factory.mktemp("finished") / "clean"
    assert clean(tiny, out) == 0
    return out




# ---------------------------------------------------------------- 1. fingerprints decide --resume

def test_differences_on_hand_made_fingerprints():
    old = {"stage": "mimic", "flags": {"lr": 0.001, "epochs": 2, "gone": 1},
           "inputs": {"teacher": "ab12" + "0" * 60, "data:cifar10/train": "ff" * 32, "trigger": "11" * 32}}
    new = {"stage": "mimic", "flags": {"lr": 0.05, "epochs": 4, "added": True},
           "inputs": {"teacher": "cd34" + "0" * 60, "data:cifar10/train": "ff" * 32, "reference": "22" * 32}}
    assert differences(old, old) == []
    assert differences(old, new, ignore=("epochs",)) == [
        "input reference not read before", "input teacher changed (sha256 ab12.. -> cd34..)",
        "input trigger no longer read", "--lr 0.001 -> 0.05", "--added (unset) -> True", "--gone 1 -> (unset)"]
    assert "--epochs 2 -> 4" in differences(old, new)
    assert differences({**old, "stage": "finetune"}, old) == ["stage finetune -> mimic"]


def test_fingerprint_hashes_files_and_drops_paths_and_free_flags(tmp_path):
    data = tmp_path / "x.bin"
    data.write_bytes(os.urandom(3 << 20))          # more than one 1 MiB chunk
    assert file_hash(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    fp = fingerprint("mimic", {"lr": 0.01, "teacher": "a/b.pth", "data_dir": "d", "device": "cpu", "seed": 1},
                     {"teacher": data, "absent": tmp_path / "none"})
    assert fp == {"stage": "mimic", "flags": {"lr": 0.01, "seed": 1},
                  "inputs": {"absent": None, "teacher": file_hash(data)}}
    assert json.loads(json.dumps(fp)) == fp


def test_resume_with_another_data_dir(tiny, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "clean")
    other = tmp_path / "other"
    shutil.copytree(tiny / "data", other)
    x = np.load(other / "cifar10/train.npz")["x"]
    y = np.load(other / "cifar10/train.npz")["y"]
    np.savez(other / "cifar10/train.npz", x=255 - x, y=y)
    before = (out / "checkpoint.pth").read_bytes()
    assert clean(tiny, out, "--epochs", "2", "--resume", data=other) == 2
    line = error(capsys)
    assert line.startswith(f"error: --resume: these inputs differ from the run in {out}: input data:cifar10/train "
                           f"changed (sha256 {file_hash(tiny / 'data/cifar10/train.npz')[:4]}.. -> "
                           f"{file_hash(other / 'cifar10/train.npz')[:4]}..); pass the original values and files")
    assert (out / "checkpoint.pth").read_bytes() == before
    same = tmp_path / "same"                        # the same bytes elsewhere are the same run
    shutil.copytree(tiny / "data", same)
    assert clean(tiny, out, "--epochs", "2", "--resume", data=same) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fingerprint"]["inputs"]["data:cifar10/train"] == file_hash(same / "cifar10/train.npz")
    assert results["fingerprint"]["flags"]["epochs"] == 2 and "data_dir" not in results["fingerprint"]["flags"]
    assert torch.load(out / "model_2.pth", weights_only=True)["fingerprint"] == results["fingerprint"]


def test_teacher_replaced_at_the_same_path(tiny, tmp_path, capsys):
    teacher = save_encoder(tmp_path / "teacher.pth", SimCLR(width=4))
    out = tmp_path / "mimic"
    assert mimic(tiny, teacher, out) == 0
    recorded = file_hash(teacher)
    torch.manual_seed(1)
    save_encoder(teacher, SimCLR(width=4))                  # another encoder at the same path
    assert mimic(tiny, teacher, out, "--epochs", "2", "--resume") == 2
    assert error(capsys) == (f"error: --resume: these inputs differ from the run in {out}: input teacher changed "
                             f"(sha256 {recorded[:4]}.. -> {file_hash(teacher)[:4]}..); pass the original values "
                             f"and files, or start a new --results_dir")


def test_nad_teacher_is_locked_while_written_and_checked_on_resume(tiny, enc, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nad"
    locked, fine_tune = [], defenses.fine_tune

    def spy(training, *args, **kwargs):
        locked.append((training.run.out_dir.name, (training.run.out_dir / ".lock").exists()))
        return fine_tune(training, *args, **kwargs)
    monkeypatch.setattr(defenses, "fine_tune", spy)
    assert cli(defenses, "--defense", "nad", "--suspect", enc, "--data_dir", tiny / "data", "--results_dir", out,
               "--ratio", "0.5", "--batch_size", "16", "--epochs", "1", "--nad_teacher_epochs", "1",
               "--device", "cpu") == 0
    assert locked[0] == ("teacher", True) and not (out / "teacher/.lock").exists()
    teacher = out / "teacher/model_1.pth"
    recorded = file_hash(teacher)
    torch.manual_seed(2)
    save_encoder(teacher, SimCLR(width=4))
    assert cli(defenses, "--defense", "nad", "--suspect", enc, "--data_dir", tiny / "data", "--results_dir", out,
               "--ratio", "0.5", "--batch_size", "16", "--epochs", "2", "--nad_teacher_epochs", "1",
               "--device", "cpu", "--resume") == 2
    assert error(capsys) == (f"error: --resume: NAD's teacher {teacher} is not the file the student trained with "
                             f"(sha256 {recorded[:4]}.. -> {file_hash(teacher)[:4]}..); start a new --results_dir")


# ---------------------------------------------------------------- 2. checkpoint integrity

def flip_tensor_byte(path, name_end="data/0"):
    """Flip one byte inside a tensor's record of a torch zip file (no CRC is checked on load)."""
    raw = bytearray(Path(path).read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(name_end))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    Path(path).write_bytes(raw)


def test_flipped_byte_inside_a_tensor(tiny, tmp_path, capsys):
    path = tmp_path / "enc.pth"
    model = SimCLR(width=4)
    files.save_checkpoint(path, {"state_dict": model.state_dict(), "arch": dict(model.config)})
    load_encoder(path)                                                  # intact: loads
    flip_tensor_byte(path)
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    assert error(capsys) == (f"error: {path} is corrupt: its weights do not match the hash stored when it was "
                             f"saved; re-run the stage that wrote it")


def test_checkpoint_without_hash_still_loads(enc):
    model, ckpt = load_encoder(enc)
    assert files.WEIGHTS_HASH not in ckpt and model.config["width"] == 4


def test_zip_failure_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "enc.pth"
    path.write_bytes(b"PK\x03\x04 not really")

    def crc_failure(*args, **kwargs):
        raise zipfile.BadZipFile("Bad CRC-32 for file 'archive/data/0'\nsecond line")
    monkeypatch.setattr(files.torch, "load", crc_failure)
    with pytest.raises(UserError) as err:
        files.load_checkpoint(path)
    assert str(err.value) == f"cannot read checkpoint {path}: Bad CRC-32 for file 'archive/data/0'"


def edit_checkpoint(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    files.save_checkpoint(path, ckpt)           # a sound file (hash recomputed): the content is the problem


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["state_dict"].pop("g.3.bias"), "lacks the weights g.3.bias; it is not a checkpoint of this model"),
    (lambda c: c["state_dict"].update(extra=torch.zeros(1)), "holds unknown weights extra; it is not a checkpoint"),
    (lambda c: c["state_dict"].update({"g.3.bias": torch.zeros(3)}), "has weights of the wrong shape g.3.bias;"),
    (lambda c: c.update(epoch=-1), "gives epoch -1, not a non-negative integer; the file is damaged"),
    (lambda c: c.update(epoch=1.5), "gives epoch 1.5, not a non-negative integer; the file is damaged"),
    (lambda c: c.update(epoch=10 ** 12), "gives epoch 1000000000000, more than any run trains (at most 1000000); "
                                         "the file is damaged: start a new --results_dir"),
    (lambda c: c.pop("optimizer"), "holds no optimiser state ('optimizer'), so the run cannot continue exactly"),
    (lambda c: c.pop("rng"), "holds no random-generator state ('rng'), so the run cannot continue exactly"),
], ids=["missing", "extra", "shape", "negative-epoch", "float-epoch", "absurd-epoch", "no-optimizer", "no-rng"])
def test_checkpoint_pth_is_validated_before_resume(tiny, finished, tmp_path, edit, message, capsys):
    out = copy_run(finished, tmp_path / "clean")
    edit_checkpoint(out / "checkpoint.pth", edit)
    assert clean(tiny, out, "--epochs", "2", "--resume") == 2
    line = error(capsys)
    assert line.startswith(f"error: --resume: {out / 'checkpoint.pth'} ") and message in line


def test_huge_claims_are_refused_before_building(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built")
    monkeypatch.setattr(encoder, "build_encoder", no_build)
    path = tmp_path / "claim.pth"
    torch.save({"state_dict": {"f.f.0.weight": torch.zeros(1024, 3, 3, 3)},
                "arch": {"arch": "resnet50", "width": 1024}}, path)
    assert 100_000 < path.stat().st_size < 120_000                        # the 112 KB file of the issue
    with pytest.raises(UserError, match=r"arch says resnet50 but the weights have the layout of resnet18$"):
        load_encoder(path)
    torch.save({"state_dict": {"f.f.0.weight": torch.zeros(1024, 3, 3, 3)},
                "arch": {"arch": "resnet18", "width": 1024}}, path)
    with pytest.raises(UserError) as err:
        load_encoder(path)
    assert str(err.value).startswith(f"{path} does not match a resnet18 encoder of width 1024: missing: f.f.1.weight, "
                                     f"f.f.1.bias, f.f.1.running_mean (+")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_expected_shapes_are_those_of_the_model(arch):
    model = SimCLR(arch, width=2, proj_dim=16)
    assert expected_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_refused(tmp_path, kind):
    state = SimCLR(width=4).state_dict()
    weight = state["g.3.bias"]
    state["g.3.bias"] = weight.to_sparse() if kind == "sparse" else torch.empty(weight.shape, device="meta")
    path = tmp_path / "enc.pth"
    torch.save({"state_dict": state, "arch": {"arch": "resnet18", "width": 4}}, path)
    with pytest.raises(UserError) as err:
        load_encoder(path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: state_dict entry 'g.3.bias' is a ")
    assert ("sparse" in line) if kind == "sparse" else ("meta tensor" in line)


# ---------------------------------------------------------------- 3. no degenerate encoder kept or scored

def test_collapse_statistic_keeps_healthy_tiny_encoders(tiny):
    """Fresh width-4 encoders on the tiny data: spread >= 0.0079 and rank >= 15 were measured
    (models/health.py); the threshold leaves a wide margin. Constant and zero features fail; the
    effective rank counts directions (1 for features on one line) but decides nothing."""
    x = np.load(tiny / "data/cifar10/train.npz")["x"]
    from datasets.loader import extract_features
    for seed in range(3):
        torch.manual_seed(seed)
        feats = extract_features(SimCLR(width=4), x, *CIFAR10, torch.device("cpu"))
        spread, rank = feature_spread(feats)
        assert spread > 20 * MIN_SPREAD and rank > 10 and collapse_reason(feats) is None
    constant = torch.ones(64, 32) / 32 ** 0.5
    assert feature_spread(constant) == (0.0, 0.0) and collapse_reason(torch.zeros(64, 32)) is not None
    line = torch.randn(64, 1) * torch.ones(1, 32) + 3.0      # every image on one line: rank 1
    assert feature_spread(line)[1] < 1.01
    assert collapse_reason(constant + 1e-5 * torch.randn(64, 32)) is not None   # noise on constant features


def constant_encoder():
    """layer4's every BatchNorm outputs a constant 1: the features are the same for every image."""
    model = SimCLR(width=4)
    for name, module in model.f.f[6].named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.zero_()
            module.bias.data.fill_(1.0)
    return model


def test_constant_feature_encoder_is_not_scored(tiny, tmp_path, capsys):
    path = save_encoder(tmp_path / "constant.pth", constant_encoder())
    assert evaluate(tiny, path, tmp_path / "eval") == 2
    line = error(capsys)
    assert line.startswith(f"error: the encoder {path} gives (near-)constant features on the train images "
                           f"(relative spread ")
    assert line.endswith("; it cannot be scored (a collapsed encoder is not a removed backdoor)")
    assert not (tmp_path / "eval/results.json").exists()


def test_badencoder_with_lr_10_is_not_saved(tiny, enc, tmp_path, capsys):
    out = tmp_path / "bad"
    assert bad(tiny, enc, out, "--lr", "10") == 2
    line = error(capsys)
    assert line.startswith("error: the badencoder encoder has collapsed to (near-)constant features (relative "
                           "spread ")
    assert line.endswith("on the first 32 training images) after training; it was not saved as a result. "
                         "Lower --lr and run again")
    assert not list(out.glob("*.pth")) and not (out / "results.json").exists()


def test_mimic_at_the_published_lr_from_the_demo_teacher_is_kept(tmp_path):
    """The shipped demo encoder as teacher at --lr 1e-2 (--ratio 0.02 --batch_size 32 --epochs 3 on
    the demo's 6,000 images) was refused at epoch 1 as collapsed, with spread 4.5e-5 on noise. On
    the first 32 images it trains on, the student's spread is 1.4e-3 after epoch 1 and 5.1e-3 after
    epoch 3: it varies, and is kept."""
    from datasets.demo import make_demo_data
    from datasets.loader import to_input
    make_demo_data(tmp_path / "data", tmp_path / "ref", 6000, 10, 10, 10, 1, 0, 0)
    out = tmp_path / "mimic"
    assert cli(MIMIC, "--teacher", ROOT / "pretrained/demo_clean.pth", "--data_dir", tmp_path / "data",
               "--lr", "1e-2", "--ratio", "0.02", "--batch_size", "32", "--epochs", "3", "--save_freq", "1",
               "--attention", "uniform", "--results_dir", out, "--device", "cpu") == 0
    x = np.load(tmp_path / "data/demo_pretrain/train.npz")["x"][:32]
    spreads = []
    for epoch in (1, 3):
        student, ckpt = load_encoder(out / f"model_{epoch}.pth")
        with torch.no_grad():
            feats = student.eval()(to_input(x, ckpt["normalization"]["mean"], ckpt["normalization"]["std"], "cpu"))[0]
        spreads.append(feature_spread(feats)[0])
    assert 1e-3 < spreads[0] < 2e-3 and 4e-3 < spreads[1] < 7e-3 and min(spreads) > 10 * MIN_SPREAD


def test_all_zero_student_is_not_saved(tiny, enc, tmp_path, capsys, monkeypatch):
    step = torch.optim.Adam.step

    def step_then_zero(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.zero_()
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_zero)
    out = tmp_path / "mimic"
    assert mimic(tiny, enc, out) == 2
    assert error(capsys).startswith("error: the mimic encoder has collapsed to (near-)constant features (relative "
                                    "spread 0, effective rank 0 on the first 32 training images) after training")
    assert not list(out.glob("*.pth"))


def test_non_finite_input_encoder_is_blamed_on_the_file(tiny, tmp_path, capsys):
    model = SimCLR(width=4)
    model.f.f[0].weight.data[0, 0, 0, 0] = float("nan")
    path = save_encoder(tmp_path / "nan.pth", model)
    assert bad(tiny, path, tmp_path / "bad") == 2
    line = error(capsys)
    assert line == (f"error: the encoder {path} has non-finite weights (NaN/inf); BadEncoder cannot start from it "
                    f"(replace the file, or re-run the stage that wrote it)")
    assert "--lr" not in line


# ---------------------------------------------------------------- 4. task consistency

def test_reference_label_must_be_the_target(tiny, enc, tmp_path, capsys):
    assert evaluate(tiny, enc, tmp_path / "eval", "--reference_label", "3", "--reference_file",
                    tiny / "priority.npz") == 2
    assert error(capsys) == (f"error: --reference_label 3 differs from the label 1 of the reference file "
                             f"{tiny / 'priority.npz'}; the reference inputs must be of the target class (pass "
                             f"the matching file, or drop one of the two)")
    assert bad(tiny, enc, tmp_path / "bad", "--target_label", "3") == 2
    assert error(capsys) == (f"error: the reference file {tiny / 'priority.npz'} holds inputs of label 1, but the "
                             f"target label is 3 (--target_label); pass the reference file of the target class")


# ---------------------------------------------------------------- 5. hostile cases: one line, exit 2, true advice

def test_overwrite_never_deletes_an_input(tiny, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "clean")
    before = sorted(p.name for p in out.iterdir())
    assert evaluate(tiny, out / "model_1.pth", out, "--overwrite") == 2
    assert error(capsys) == (f"error: --overwrite would delete {out / 'model_1.pth'}, the input encoder of this run, "
                             f"with the old run in {out}; copy it out of the folder or use another --results_dir")
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == before


def test_disk_full_inside_torch_save(tiny, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC)
    monkeypatch.setattr(files.torch, "save", full)
    out = tmp_path / "clean"
    assert clean(tiny, out) == 2
    assert error(capsys) == (f"error: cannot write {out / 'model_1.pth'}: No space left on device; the previous "
                             f"version of the file is kept (free some space and run the command again)")
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("stage", ["clean", "mimic", "finetune"])
def test_batch_of_one_with_batchnorm(tiny, enc, tmp_path, stage, capsys):
    out = tmp_path / stage
    if stage == "clean":
        code = clean(tiny, out, "--batch_size", "1")
    elif stage == "mimic":
        code = mimic(tiny, enc, out, "--batch_size", "1")
    else:
        code = cli(defenses, "--defense", "finetune", "--suspect", enc, "--data_dir", tiny / "data", "--results_dir",
                   out, "--batch_size", "1", "--device", "cpu")
    assert code == 2
    assert error(capsys) == ("error: --batch_size 1: this stage trains BatchNorm layers, whose statistics need at "
                             "least 2 images per batch; use --batch_size 2 or more")
    assert not out.exists()


@pytest.mark.parametrize("device", ["mps", "xla", "meta"])
def test_unsupported_devices(tiny, enc, tmp_path, device, capsys):
    assert evaluate(tiny, enc, tmp_path / "eval", "--device", device) == 2
    assert error(capsys) == (f"error: --device {device}: the stages run on cpu or cuda only; use auto, cpu, cuda "
                             f"or cuda:N")


@pytest.mark.parametrize("module, argv, message", [
    (train_clean_encoder, ["--width", "1e9"], "--width: must be an integer from 1 to 1024, got 1e9"),
    (train_clean_encoder, ["--width", "100000"], "--width: must be an integer from 1 to 1024, got 100000"),
    (train_badencoder, ["--pretrained_encoder", "e.pth", "--reference_copies", "1e9"],
     "--reference_copies: must be an integer from 1 to 65536, got 1e9"),
    (train_badencoder, ["--pretrained_encoder", "e.pth", "--reference_copies", "1000000"],
     "--reference_copies: must be an integer from 1 to 65536, got 1000000"),
    (MIMIC, ["--teacher", "e.pth", "--mi_hidden", "1e12"], "--mi_hidden: must be an integer from 1 to 65536, got 1e12"),
    (downstream, ["--encoder", "e.pth", "--hidden_size_2", "99999999"],
     "--hidden_size_2: must be an integer from 1 to 65536, got 99999999"),
])
def test_unbounded_sizes_are_refused_at_parse_time(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.get_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert error(capsys).endswith(f"error: argument {message}")


@pytest.mark.parametrize("pid", [10 ** 12, -5])
def test_lock_with_an_absurd_pid_is_stale(tmp_path, pid, capsys):
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "then"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert error(capsys) == f"note: took over the stale lock of an unknown process (unreadable lock file) in {tmp_path}"


def test_interrupted_stage_without_resume_does_not_advise_it(tiny, enc, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(downstream, "train_one_epoch", interrupted)
    assert evaluate(tiny, enc, tmp_path / "eval") == 130
    line = error(capsys)
    assert line == ("interrupted: this stage keeps no checkpoint, so nothing was saved; run the command again to "
                    "start over")
    assert "--resume" not in line


def test_stage_3_records_its_fingerprint(tiny, enc, tmp_path):
    assert evaluate(tiny, enc, tmp_path / "eval", "--reference_file", tiny / "priority.npz") == 0
    fp = json.loads((tmp_path / "eval/results.json").read_text())["fingerprint"]
    assert fp["stage"] == "downstream" and fp["inputs"] == {
        "data:gtsrb/test": file_hash(tiny / "data/gtsrb/test.npz"), "data:gtsrb/train": file_hash(
            tiny / "data/gtsrb/train.npz"), "encoder": file_hash(enc), "reference": file_hash(tiny / "priority.npz"),
        "trigger": file_hash(TRIGGER)}
    assert "encoder" not in fp["flags"] and fp["flags"]["epochs"] == 1
