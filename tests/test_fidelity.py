"""Issue 13: the stages do what the authors' code does, checked through the scripts with spies on
what they read and feed: STL-10's unlabeled split, BadEncoder's reference copies and dropped last
batch, the downstream training order, float32 by default, and the MI estimator's options."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets.attack
import MIMIC
import train_badencoder
import train_clean_encoder
import training_downstream_classifier as downstream
from datasets import NORMALIZATION, normalization_record, save_split
from datasets.loader import ViewLoader, index_batches
from models import SimCLR, encoder_checkpoint
from models.mine import MISettings
from utils.cli import add_run_args
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = str(ROOT / "trigger/trigger_pt_white_21_10_ap_replace.npz")
SIZES = {"train": 40, "test": 20, "train_unlabeled": 72}     # different counts tell the splits apart


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def stl(tmp_path_factory):
    """Tiny STL-10: labelled train/test and an unlabeled split (labels -1), each its own images;
    and an encoder normalised as STL-10."""
    root = tmp_path_factory.mktemp("stl")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in SIZES.items():
        x = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        y = np.full(n, -1) if split == "train_unlabeled" else np.arange(n) % 10
        save_split(root / "data/stl10" / f"{split}.npz", x, y)
        splits[split] = x
    encoder = root / "stl10_encoder.pth"
    torch.save(encoder_checkpoint(SimCLR(width=4), normalization=normalization_record("stl10", *NORMALIZATION["stl10"])),
               encoder)
    return root, splits, encoder


def record_view_loader(monkeypatch, module):
    """Replace the stage's ViewLoader by one that records the images it is given."""
    seen = []

    class Recording(ViewLoader):
        def __init__(self, images, *args, **kwargs):
            seen.append(images)
            super().__init__(images, *args, **kwargs)

    monkeypatch.setattr(module, "ViewLoader", Recording)
    return seen


def record_calls(monkeypatch, module, name):
    """Wrap module.<name>, recording each call's (args, kwargs, result)."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, spy)
    return calls


# ---------------------------------------------------------------- --init

def conv_bounds_hold(model):
    """Every backbone conv but the stem within PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    convs = [m.weight for m in model.f.f.modules() if isinstance(m, torch.nn.Conv2d)][1:]
    return all(w.abs().max() <= 1 / w[0].numel() ** 0.5 for w in convs)


@pytest.mark.parametrize("init", ["torchvision", "pytorch"])
def test_init_flag_reaches_stage_0_and_the_mimic_student(stl, tmp_path, monkeypatch, init):
    """The fresh networks are judged as built (training moves the weights afterwards)."""
    root, _, encoder = stl
    fresh = []
    simclr, build_encoder = train_clean_encoder.SimCLR, MIMIC.build_encoder

    def stage0_model(*args, **kwargs):
        model = simclr(*args, **kwargs)
        fresh.append(("stage 0", kwargs["init"], conv_bounds_hold(model)))
        return model

    def student(config, init):
        model = build_encoder(config, init)
        fresh.append(("student", init, conv_bounds_hold(model)))
        return model

    monkeypatch.setattr(train_clean_encoder, "SimCLR", stage0_model)
    monkeypatch.setattr(MIMIC, "build_encoder", student)
    clean_stl(root, tmp_path / "clean", "--init", init, "--knn_freq", "0")
    MIMIC.main(MIMIC.get_parser().parse_args(
        ["--data_dir", str(root / "data"), "--teacher", str(encoder), "--results_dir", str(tmp_path / "mimic"),
         "--ratio", "0.5", "--batch_size", "16", "--epochs", "1", "--attention", "uniform", "--device", "cpu",
         "--init", init]))
    # kaiming-normal fan_out exceeds the default uniform bound somewhere; the default never does
    assert fresh == [("stage 0", init, init == "pytorch"), ("student", init, init == "pytorch")]


# ---------------------------------------------------------------- STL-10's unlabeled split

def clean_stl(root, out, *extra):
    return train_clean_encoder.main(train_clean_encoder.get_parser().parse_args(
        ["--data_dir", str(root / "data"), "--pretraining_dataset", "stl10", "--results_dir", str(out),
         "--width", "4", "--batch_size", "16", "--epochs", "1", "--device", "cpu", "--knn_k", "10", *extra]))


def test_clean_encoder_trains_on_the_unlabeled_split_and_monitors_on_train(stl, tmp_path, monkeypatch):
    root, splits, _ = stl
    views = record_view_loader(monkeypatch, train_clean_encoder)
    reads = record_calls(monkeypatch, train_clean_encoder, "load_split")
    clean_stl(root, tmp_path / "clean")
    assert [call[0][1:] for call in reads] == [("stl10", "train_unlabeled"), ("stl10", "train"), ("stl10", "test")]
    [images] = views
    assert np.array_equal(images, splits["train_unlabeled"])
    assert read(tmp_path / "clean/results.json")["knn_acc"] is not None      # the monitor ran on train/test


def test_pretraining_split_train_restores_train(stl, tmp_path, monkeypatch):
    root, splits, _ = stl
    views = record_view_loader(monkeypatch, train_clean_encoder)
    clean_stl(root, tmp_path / "clean", "--pretraining_split", "train", "--knn_freq", "0")
    assert np.array_equal(views[0], splits["train"])


def test_missing_unlabeled_split_is_named(stl, tmp_path):
    root, _, _ = stl
    for split in ("train", "test"):
        (tmp_path / "data/stl10").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"data/stl10/{split}.npz").write_bytes((root / f"data/stl10/{split}.npz").read_bytes())
    with pytest.raises(UserError, match=rf"dataset file not found: {tmp_path}/data/stl10/train_unlabeled\.npz"):
        clean_stl(tmp_path, tmp_path / "clean")


def test_badencoder_shadow_data_is_the_first_images_of_the_unlabeled_split(stl, tiny, tmp_path, monkeypatch,
                                                                           capsys):
    root, splits, encoder = stl
    monkeypatch.setattr(train_badencoder, "UNLABELED_SHADOW_IMAGES", 48)
    stamped = record_calls(monkeypatch, datasets.attack, "stamp_trigger")
    batches = record_calls(monkeypatch, train_badencoder, "index_batches")
    train_badencoder.main(train_badencoder.get_parser().parse_args(
        ["--data_dir", str(root / "data"), "--pretrained_encoder", str(encoder), "--results_dir", str(tmp_path / "bad"),
         "--reference_file", str(tiny / "priority.npz"), "--trigger_file", TRIGGER, "--batch_size", "16",
         "--epochs", "1", "--device", "cpu"]))
    assert np.array_equal(stamped[0][0][0], splits["train_unlabeled"][:48])
    assert batches[0][0][0] == 48
    assert "shadow data: 48 images of stl10; 2 reference input(s) of label 1" in capsys.readouterr().out


def test_mimic_distils_on_the_unlabeled_split_and_estimates_mi_on_train(stl, tmp_path, monkeypatch, capsys):
    root, splits, encoder = stl
    views = record_view_loader(monkeypatch, MIMIC)
    located = record_calls(monkeypatch, MIMIC, "locate_knowledge")
    MIMIC.main(MIMIC.get_parser().parse_args(
        ["--data_dir", str(root / "data"), "--teacher", str(encoder), "--results_dir", str(tmp_path / "mimic"),
         "--ratio", "0.5", "--batch_size", "16", "--epochs", "1", "--mi_epochs", "1", "--device", "cpu"]))
    assert np.array_equal(views[0], splits["train_unlabeled"][:36])          # 0.5 x 72
    assert np.array_equal(located[0][0][1], splits["train"][:20])            # 0.5 x 40
    assert ("clean subset: 36 images of train_unlabeled; locating knowledge in the teacher on 20 images"
            in capsys.readouterr().out)
    assert read(tmp_path / "mimic/results.json")["clean_images"] == 36


# ---------------------------------------------------------------- BadEncoder's reference copies and last batch

@pytest.fixture(scope="module")
def shadow40(tiny, tmp_path_factory):
    """40 shadow images: at batch 16, two full batches and one of 8."""
    data = tmp_path_factory.mktemp("shadow") / "data"
    rng = np.random.default_rng(1)
    save_split(data / "shadow40/train.npz", rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), np.zeros(40, int))
    encoder = data.parent / "enc.pth"
    torch.save(encoder_checkpoint(SimCLR(width=4)), encoder)         # normalised as cifar10 by name
    return data, encoder


@pytest.mark.parametrize("extra, copies, sizes", [
    ([], 16, [16, 16]),                                   # the authors: batch_size copies, last batch dropped
    (["--reference_copies", "1"], 1, [16, 16]),
    (["--keep_last_batch"], 16, [16, 16, 8]),
    (["--batch_size", "8"], 8, [8] * 5),
])
def test_badencoder_reference_copies_and_last_batch(tiny, shadow40, tmp_path, monkeypatch, extra, copies, sizes):
    data, encoder = shadow40
    augmented = record_calls(monkeypatch, train_badencoder, "augment_copies")
    batches = record_calls(monkeypatch, train_badencoder, "index_batches")
    train_badencoder.main(train_badencoder.get_parser().parse_args(
        ["--data_dir", str(data), "--shadow_dataset", "shadow40", "--pretrained_encoder", str(encoder),
         "--results_dir", str(tmp_path / "bad"), "--reference_file", str(tiny / "priority.npz"),
         "--trigger_file", TRIGGER, "--batch_size", "16", "--epochs", "1", "--device", "cpu", *extra]))
    [(_, _, epoch_batches)] = batches
    assert [len(b) for b in epoch_batches] == sizes
    assert [args[2] for args, _, _ in augmented] == [copies] * len(sizes)            # one call per step
    assert all(len(out) == 2 * copies for _, _, out in augmented)                     # 2 reference inputs


# ---------------------------------------------------------------- downstream training order

@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_downstream_training_order(tiny, shadow40, tmp_path, monkeypatch, order):
    _, encoder = shadow40
    batches = record_calls(monkeypatch, downstream, "index_batches")
    args = downstream.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--encoder", str(encoder), "--results_dir", str(tmp_path / "eval"),
         "--reference_label", "1", "--trigger_file", TRIGGER, "--nn_epochs", "2", "--batch_size", "16",
         "--device", "cpu", *(["--train_order", order] if order == "file" else [])])
    assert args.train_order == order
    downstream.main(args)
    orders = [torch.cat(result).tolist() for _, _, result in batches]
    assert len(orders) == 2 and all(sorted(o) == list(range(48)) for o in orders)
    if order == "file":
        assert orders == [list(range(48))] * 2
    else:
        assert orders[0] != list(range(48)) and orders[0] != orders[1]
        for epoch, o in enumerate(orders, 1):                 # seeded by --seed (100) and the epoch
            assert o == torch.cat(index_batches(48, 16, 100, epoch, drop_last=False)).tolist()


# ---------------------------------------------------------------- float32 by default

def test_amp_is_off_by_default():
    parser = argparse.ArgumentParser()
    add_run_args(parser, seed=1)
    assert parser.parse_args([]).amp == "off"
    for module, required in ((train_clean_encoder, []), (train_badencoder, ["--pretrained_encoder", "e"]),
                             (MIMIC, ["--teacher", "e"]), (downstream, ["--encoder", "e"])):
        assert module.get_parser().parse_args(required).amp == "off", module.__name__


# ---------------------------------------------------------------- the MI estimator's options

def test_mimic_mi_options_reach_the_estimator_and_are_recorded(tiny, shadow40, tmp_path, monkeypatch):
    _, encoder = shadow40
    estimates = record_calls(monkeypatch, MIMIC, "estimate_mi")
    located = record_calls(monkeypatch, MIMIC, "locate_knowledge")
    out = tmp_path / "mimic"
    MIMIC.main(MIMIC.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--teacher", str(encoder), "--results_dir", str(out), "--ratio", "0.5",
         "--batch_size", "16", "--epochs", "1", "--mi_epochs", "2", "--device", "cpu", "--mi_standardize", "none",
         "--mi_evaluation", "per_batch", "--mi_model", "student", "--mi_holdout", "0", "--mi_schedule", "constant",
         "--mi_order", "ordered", "--mi_first_layer", "joint"]))
    assert len(estimates) == 4
    assert all(args[2] == MISettings(epochs=2, standardize="none", evaluation="per_batch", holdout=0.0,
                                     schedule="constant", order="ordered", first_layer="joint", seed=100)
               for args, kw, _ in estimates)
    teacher = torch.load(encoder, weights_only=True)["state_dict"]["f.f.0.weight"]
    measured = located[0][0][0]                                  # the network whose blocks were measured
    assert not torch.equal(measured.state_dict()["f.f.0.weight"].cpu(), teacher)      # the fresh student
    mi = read(out / "mi.json")
    assert mi["mi_model"] == "student" and len(mi["mi"]) == 4
    assert [len(h) for h in mi["history"]] == [2] * 4
    assert [r["reason"] for r in mi["convergence"]] == ["too few epochs"] * 4
    args = read(out / "args.json")
    assert (args["mi_standardize"], args["mi_evaluation"], args["mi_model"], args["mi_holdout"],
            args["mi_schedule"], args["mi_order"], args["mi_first_layer"]) == (
        "none", "per_batch", "student", 0.0, "constant", "ordered", "joint")
    assert read(out / "results.json")["mi_converged"] == dict.fromkeys(("layer1", "layer2", "layer3", "layer4"),
                                                                        "too few epochs")
