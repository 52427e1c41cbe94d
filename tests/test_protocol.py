"""Issue 24: the authors' setting in one flag (--protocol authors), on the authors' own reference
images: the released files and their md5, the published commands' default reference, every stage's
table of the authors' values, the estimator's ordered batches and joint first layer, the medoid
pick of --make_reference, and prepare_data's checks of the shipped files and of its flags."""
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets.attack
import MIMIC
import defenses
import prepare_data
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
from datasets import load_reference, save_split
from datasets.prepare import make_reference, pick_reference
from models import SimCLR, encoder_checkpoint
from models.mine import StatisticsNetwork, training_batches
from paper import RELEASED_REFERENCES, TASKS, TRIGGER, paper_task
from utils.cli import run_cli, shown

ROOT = Path(__file__).resolve().parent.parent


def read(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- the released reference files

def test_shipped_references_are_the_released_files_with_their_tasks_labels():
    tasks = [t for ts in TASKS.values() for t in ts]
    assert sorted({t.reference for t in tasks}) == sorted(RELEASED_REFERENCES)      # one md5 per task file
    for t in tasks:
        path = ROOT / t.reference
        assert hashlib.md5(path.read_bytes()).hexdigest() == RELEASED_REFERENCES[t.reference], t.reference
        x, label = load_reference(path)
        assert label == t.label, t.reference
        assert x.shape == (1, 32, 32, 3) and x.dtype == np.uint8          # one image each, as released


def test_the_published_badencoder_command_trains_on_the_released_priority_sign(tiny, tmp_path, monkeypatch):
    """The published stage-1 command (README.md, "The four commands of the paper") without
    --reference_file (its default) reads
    reference/cifar10/priority.npz; results.json records it and the protocol."""
    monkeypatch.chdir(ROOT)                     # the published paths are relative to the repository
    encoder = tmp_path / "clean.pth"
    torch.save(encoder_checkpoint(SimCLR(width=4)), encoder)          # normalised as cifar10 by name
    reads = []
    real = datasets.attack.load_reference

    def spy(path):
        reads.append(str(path))
        return real(path)
    monkeypatch.setattr(datasets.attack, "load_reference", spy)
    out = tmp_path / "bad"
    train_badencoder.main(train_badencoder.get_parser().parse_args(
        ["--trigger_file", TRIGGER, "--pretraining_dataset", "cifar10", "--downstreamTask", "gtsrb",
         "--pretrained_encoder", str(encoder), "--results_dir", str(out), "--data_dir", str(tiny / "data"),
         "--batch_size", "32", "--epochs", "1", "--device", "cpu", "--protocol", "authors"]))
    assert reads == ["reference/cifar10/priority.npz"] == [paper_task("cifar10", "gtsrb").reference]
    results = read(out / "results.json")
    assert results["target_label"] == 12
    assert (results["args"]["reference_file"], results["args"]["protocol"]) == ("reference/cifar10/priority.npz",
                                                                                "authors")


def test_the_published_downstream_command_targets_the_released_label(monkeypatch):
    monkeypatch.chdir(ROOT)
    args = downstream.get_parser().parse_args(
        ["--dataset", "gtsrb", "--reference_label", "12", "--trigger_file", TRIGGER, "--encoder_usage_info",
         "cifar10", "--encoder", "purified.pth", "--reference_file", "reference/cifar10/priority.npz",
         "--nn_epochs", "1000"])
    assert downstream.target_label(args, num_classes=43) == 12         # the file's label agrees with the flag
    args.reference_label = -1
    assert downstream.target_label(args, num_classes=43) == 12         # or comes from the file alone


def test_downstream_results_record_the_protocol(tiny, tmp_path):
    encoder = tmp_path / "enc.pth"
    torch.save(encoder_checkpoint(SimCLR(width=4)), encoder)
    out = tmp_path / "eval"
    downstream.main(downstream.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--encoder", str(encoder), "--results_dir", str(out),
         "--reference_file", str(tiny / "priority.npz"), "--trigger_file", str(ROOT / TRIGGER),
         "--nn_epochs", "1", "--device", "cpu", "--protocol", "authors"]))
    args = read(out / "results.json")["args"]
    assert (args["protocol"], args["train_order"]) == ("authors", "file")
    # the authors' cuDNN setting is applied (deterministic algorithms, no autotuner) ...
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    downstream.main(downstream.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--encoder", str(encoder), "--results_dir", str(out / "ours"),
         "--reference_file", str(tiny / "priority.npz"), "--trigger_file", str(ROOT / TRIGGER),
         "--nn_epochs", "1", "--device", "cpu"]))
    # ... and ours is torch's default
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False


# ---------------------------------------------------------------- --protocol authors, stage by stage

# Written out here from docs/fidelity.md's first table, not read from the stages: {stage: (required flags,
# {dest: (ours, authors)})}. Only the listed options may differ between the two protocols.
PROTOCOLS = {
    train_clean_encoder: ([], {
        "init": ("torchvision", "torchvision"),
        "pretraining_split": ("auto", "auto"),
        "augment": ("batched", "torchvision"),
        "amp": ("off", "off"),
        "channels_last": ("auto", "off"),
        "cudnn_deterministic": ("off", "on"),
    }),
    train_badencoder: (["--pretrained_encoder", "e.pth"], {
        "pretraining_split": ("auto", "auto"),
        "reference_copies": (None, None),           # None = --batch_size copies
        "keep_last_batch": (False, False),
        "amp": ("off", "off"),
        "channels_last": ("auto", "off"),
        "cudnn_deterministic": ("off", "on"),
    }),
    MIMIC: (["--teacher", "e.pth"], {
        "init": ("torchvision", "torchvision"),
        "pretraining_split": ("auto", "auto"),
        "augment": ("batched", "torchvision"),
        "amp": ("off", "off"),
        "channels_last": ("auto", "off"),
        "cudnn_deterministic": ("off", "on"),
        "mi_model": ("teacher", "student"),
        "mi_epochs": (200, 200),
        "mi_lr": (1e-3, 1e-3),
        "mi_weight_decay": (1e-5, 1e-5),
        "mi_hidden": (512, 512),
        "mi_average_last": (10, 10),
        "mi_standardize": ("feature", "none"),
        "mi_evaluation": ("global", "per_batch"),
        "mi_holdout": (0.2, 0.0),
        "mi_schedule": ("cosine", "constant"),
        "mi_order": ("shuffled", "ordered"),
        "mi_first_layer": ("split", "joint"),
    }),
    defenses: (["--defense", "finetune", "--suspect", "e.pth"], {
        "augment": ("batched", "torchvision"),
        "amp": ("off", "off"),
        "channels_last": ("auto", "off"),
        "cudnn_deterministic": ("off", "on"),
    }),
    downstream: (["--encoder", "e.pth"], {
        "train_order": ("shuffled", "file"),
        "amp": ("off", "off"),
        "cudnn_deterministic": ("off", "on"),
    }),
}


def parse(module, *argv):
    return vars(module.get_parser().parse_args([*PROTOCOLS[module][0], *argv]))


def test_protocol_authors_sets_every_listed_option_and_ours_keeps_todays_defaults():
    for module, (_, table) in PROTOCOLS.items():
        name = module.__name__
        assert list(module.AUTHORS) == list(table), name             # the stage's table: these options
        ours, authors = parse(module), parse(module, "--protocol", "authors")
        assert parse(module, "--protocol", "ours") == ours, name
        assert (ours["protocol"], authors["protocol"]) == ("ours", "authors"), name
        for dest, (ours_value, authors_value) in table.items():
            assert ours[dest] == ours_value, (name, dest)
            assert authors[dest] == authors_value, (name, dest)
        assert {d: v for d, v in ours.items() if d not in table and d != "protocol"} == \
               {d: v for d, v in authors.items() if d not in table and d != "protocol"}, name
        helps = {a.dest: a.help for a in module.get_parser()._actions}
        for dest, (_, authors_value) in table.items():
            assert f"--protocol authors: {shown(authors_value)})" in helps[dest], (name, dest)


OVERRIDES = [(module, dest, values[0]) for module, (_, table) in PROTOCOLS.items()
             for dest, values in table.items() if values[0] != values[1]]


@pytest.mark.parametrize("module, dest, ours_value", OVERRIDES,
                         ids=[f"{m.__name__}-{d}" for m, d, _ in OVERRIDES])
def test_an_explicit_flag_wins_over_the_protocol(module, dest, ours_value):
    table = PROTOCOLS[module][1]
    flag = next(a.option_strings[0] for a in module.get_parser()._actions if a.dest == dest)
    for argv in ([flag, shown(ours_value), "--protocol", "authors"], ["--protocol=authors", flag, shown(ours_value)]):
        args = parse(module, *argv)
        assert args[dest] == ours_value, argv
        assert all(args[d] == v[1] for d, v in table.items() if d != dest), argv


# ---------------------------------------------------------------- the authors' MI estimator

def test_ordered_mi_batches_keep_the_last_partial_batch_in_data_order():
    generator = torch.Generator().manual_seed(0)
    batches = training_batches(torch.arange(10), 4, "ordered", generator)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = training_batches(torch.arange(10), 4, "shuffled", generator)
    assert [len(b) for b in shuffled] == [4, 4]                          # ours: the last one dropped


def test_joint_first_layer_is_initialised_over_the_joint_fan_in():
    da, dz = 60, 4
    bound = 1 / (da + dz) ** 0.5                                        # 0.125
    torch.manual_seed(0)
    joint = StatisticsNetwork(da, dz, hidden=512, first_layer="joint")
    assert joint.fc.weight.shape == (512, da + dz)
    assert joint.fc.weight.abs().max() <= bound and joint.fc.bias.abs().max() <= bound
    assert joint.fc.weight.abs().max() > 0.99 * bound                  # uniform over the whole interval
    split = StatisticsNetwork(da, dz, hidden=512, first_layer="split")
    assert split.fc_z.weight.abs().max() > 3 * bound                   # its own bound: 1/sqrt(4) = 0.5
    assert split.fc_z.weight.abs().max() <= 1 / dz ** 0.5


# ---------------------------------------------------------------- --make_reference: the medoid

def square(top, left, side=12):
    image = np.full((32, 32, 3), 20, dtype=np.uint8)
    image[top:top + side, left:left + side] = (230, 200, 40)
    return image


def test_medoid_pick_takes_the_centred_image_of_the_class(tmp_path):
    # five views of one sign: shifted up, left, right, down, and the centred one (index 4)
    views = np.stack([square(6, 10), square(10, 6), square(10, 14), square(14, 10), square(10, 10)])
    assert pick_reference(views, 1, "medoid").tolist() == [4]
    assert pick_reference(views, 1, "first").tolist() == [0]
    assert pick_reference(views, 2, "medoid")[0] == 4
    rng = np.random.default_rng(0)
    others = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)       # another class around them
    x = np.concatenate([others[:1], views[:2], others[1:], views[2:]])
    y = np.array([0, 7, 7, 0, 0, 7, 7, 7])
    save_split(tmp_path / "data/shapes/train.npz", x, y)
    ref = tmp_path / "ref"
    argv = ["--make_reference", "shapes", "7", "sign", "--out", str(tmp_path / "data"), "--reference_dir", str(ref)]
    assert prepare_data.main(prepare_data.get_parser().parse_args(argv)) == 0
    got, label = load_reference(ref / "cifar10/sign.npz")
    assert label == 7 and np.array_equal(got, views[4:5])
    make_reference(tmp_path / "data", "shapes", 7, ref / "first.npz", pick="first")
    assert np.array_equal(load_reference(ref / "first.npz")[0], views[:1])


# ---------------------------------------------------------------- prepare_data.py

def test_references_reports_the_shipped_files_md5_ok(capsys):
    argv = ["--references", "--reference_dir", str(ROOT / "reference")]
    assert prepare_data.main(prepare_data.get_parser().parse_args(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines[1:] if line.endswith("released, md5 ok")]
    assert len(rows) == len(lines) - 1 == len(RELEASED_REFERENCES)
    assert rows[0].split()[:3] == [str(ROOT / "reference/cifar10/priority.npz"), "released", "(gtsrb"]


def test_altered_or_missing_released_file_is_one_line_naming_git_checkout(tmp_path, capsys):
    copy = tmp_path / "reference"
    shutil.copytree(ROOT / "reference", copy)
    altered = copy / "cifar10/one.npz"
    altered.write_bytes(altered.read_bytes() + b"\0")
    (copy / "stl10/airplane.npz").unlink()
    changed = altered.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prepare_data.main, prepare_data.get_parser(), ["--references", "--force", "--reference_dir", str(copy)])
    assert exit_info.value.code == 2
    md5 = hashlib.md5(changed).hexdigest()
    assert capsys.readouterr().err == (
        f"error: {altered} has md5 {md5}, not the released dfbea5e2be57f8ec2502b91674d85523; "
        f"{copy}/stl10/airplane.npz is missing: restore the authors' files with: "
        f"git checkout -- reference/cifar10/one.npz reference/stl10/airplane.npz\n")
    assert altered.read_bytes() == changed and not (copy / "stl10/airplane.npz").exists()   # nothing rewritten


def test_prepare_data_bad_seed_and_out_file_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.get_parser().parse_args(["--references", "--seed", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].endswith("error: argument --seed: must be an integer from 0 to 4294967295, got -1")
    out = tmp_path / "data"
    out.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prepare_data.main, prepare_data.get_parser(), ["--make_reference", "gtsrb", "1", "x", "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: --out {out} is a file, not a folder; name a folder "
                                       f"(it is created if missing)\n")


def test_the_repository_cites_no_file_it_does_not_hold():
    """Citations name the paper, the authors' code or a page of our docs: no tracked text file
    refers to a specification file or a folder outside the repository."""
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [n for n in names if n.endswith((".py", ".md", ".ini", ".txt", ".json")) or n == ".ci/run"]
    assert len(texts) > 50
    words = ("SP" + "EC", ".." + "/shared")     # spelled in parts, so that this file does not hold them
    bad = [(n, w) for n in texts for w in words
           if re.search(rf"(?<![\w.]){re.escape(w)}(?!\w)", (ROOT / n).read_text(errors="replace"))]
    assert bad == []
