"""The DRUPE stage (train_drupe.py) at tiny size: its files, a resume that equals the uninterrupted
run, its one-line errors, the flags that reach the schedule and the quirks, the checkpoint that the
later stages read; the released three-image references and the demo's; the pure pieces the stage
adds to models/drupe.py (BadEncoder's averaged loss_0, the success test, the best-epoch rule)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train_drupe
from datasets import load_reference, save_reference
from datasets.demo import DEFAULTS, DOWNSTREAM_NAME, demo_drupe_task, first_of_class, make_split
from models import SimCLR, encoder_checkpoint, load_encoder
from models.drupe import BestTracker, CostSchedule, DrupePhases, attack_loss
from paper import DRUPE_TASKS, RELEASED_DRUPE_REFERENCES, TASKS, drupe_task
from stage_cli import TRIGGER, cli, error, evaluate, mimic
from utils.cli import shown

ROOT = Path(__file__).resolve().parent.parent


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A fresh width-4 encoder, normalised as cifar10 by name (the tiny data's folder)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "clean.pth"
    torch.save(encoder_checkpoint(SimCLR(width=4)), path)
    return path


@pytest.fixture(scope="module")
def refs(tiny, tmp_path_factory):
    """Three reference inputs of label 1, and a file with one."""
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(1)
    save_reference(folder / "three.npz", rng.integers(0, 200, (3, 32, 32, 3), dtype=np.uint8), 1)
    save_reference(folder / "one.npz", rng.integers(0, 200, (1, 32, 32, 3), dtype=np.uint8), 1)
    return folder


# Tiny size: 48 of the 64 images, batch 16 (3 steps), 2 copies of each reference; the costs
# adapt after epochs 2 and 3, best.pth is tracked after epoch 1.
TINY = ["--batch_size", "16", "--shadow_size", "48", "--reference_copies", "2", "--lr", "0.01",
        "--warm_up_end", "1", "--stage_1_end", "1", "--fix_end", "1", "--best_after", "1"]


def drupe(tiny, encoder, out, reference, *extra, epochs=3):
    return cli(train_drupe, "--data_dir", tiny / "data", "--pretrained_encoder", encoder, "--results_dir", out,
               "--reference_file", reference, "--trigger_file", TRIGGER, "--epochs", str(epochs), "--device", "cpu",
               *TINY, *extra)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------- the stage's files

def test_stage_trains_only_the_backbone_and_writes_its_files(tiny, encoder, refs, tmp_path, capsys):
    out = tmp_path / "drupe"
    assert drupe(tiny, encoder, out, refs / "three.npz", "--shadow_size", "1000") == 0
    printed = capsys.readouterr().out
    assert "shadow data: cifar10 train holds 64 images, fewer than --shadow_size 1000: training on all of them" \
        in printed
    assert "shadow data: 64 images of cifar10; 3 reference inputs of label 1" in printed
    assert {p.name for p in out.iterdir()} >= {"args.json", "log.jsonl", "log.csv", "checkpoint.pth", "model_3.pth",
                                               "model_best.pth", "results.json"}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # The costs are the initial ones up to --fix_end 1, then move by the epoch's mean losses and its
    # last batch's sim_b2b: replayed here from the log.
    costs = CostSchedule()
    for row in rows:
        assert (row["cost"], row["cost_1"]) == pytest.approx((costs.cost, costs.cost_1))
        costs = costs.update({**row, "sim_b2b": row["sim_b2b_last"]}, row["epoch"], DrupePhases(1, 1, 1))
    assert rows[1]["cost"] == 0.1 and rows[2]["cost"] != 0.1
    results = read(out / "results.json")
    assert (results["stage"], results["encoder"], results["target_label"], results["output"]) == \
           ("drupe", "model_3.pth", 1, "last")
    assert (results["best_epoch"], results["shadow_images"]) == (2, 64)   # carried measure 0: epoch 2 kept
    model, ckpt = load_encoder(out / "model_3.pth")
    assert (ckpt["stage"], ckpt["usage"], ckpt["target_label"]) == ("drupe", "cifar10", 1)
    assert ckpt["normalization"]["dataset"] == "cifar10"
    before, after = weights(encoder), model.state_dict()
    assert not torch.equal(before["f.f.0.weight"], after["f.f.0.weight"])          # the backbone trained
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("g."))   # the head carried
    batchnorm = [f"{name}.{k}" for name, m in model.named_modules()
                 if isinstance(m, torch.nn.BatchNorm2d) for k in m.state_dict()]
    assert len(batchnorm) == 20 * 5 and all(torch.equal(before[k], after[k]) for k in batchnorm)   # BN frozen
    assert torch.load(out / "model_best.pth", weights_only=True)["epoch"] == 2


def test_the_output_encoder_feeds_stage_3_and_mimic(tiny, encoder, refs, tmp_path):
    out = tmp_path / "drupe"
    assert drupe(tiny, encoder, out, refs / "three.npz", "--output", "best") == 0
    results = read(out / "results.json")
    assert (results["encoder"], results["output"]) == ("model_best.pth", "best")
    assert evaluate(tiny, out / results["encoder"], tmp_path / "eval", "--dataset", "gtsrb") == 0
    assert read(tmp_path / "eval/results.json")["target_label"] == 1
    assert mimic(tiny, out / results["encoder"], tmp_path / "mimic", "--mi_epochs", "1") == 0   # as a teacher
    assert read(tmp_path / "mimic/results.json")["args"]["pretraining_dataset"] == "cifar10"


def test_resumed_run_equals_the_uninterrupted_one(tiny, encoder, refs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert drupe(tiny, encoder, full, refs / "three.npz") == 0
    assert drupe(tiny, encoder, cut, refs / "three.npz", epochs=2) == 0          # stopped after epoch 2
    assert drupe(tiny, encoder, cut, refs / "three.npz", "--resume") == 0
    for name in ("model_3.pth", "model_best.pth"):
        a, b = weights(full / name), weights(cut / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = [read_rows(folder) for folder in (full, cut)]
    assert rows[0] == rows[1]                   # every logged term, cost and best epoch alike
    states = [torch.load(folder / "checkpoint.pth", weights_only=True)["drupe"] for folder in (full, cut)]
    assert states[0] == states[1] and states[0]["costs"]["cost"] != 0.1       # the costs moved, and resumed


def read_rows(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- flags reach the schedule

def test_phase_flags_and_quirks_reach_the_objective(tiny, encoder, refs, tmp_path, monkeypatch):
    seen = {}
    real_loss, real_terms = train_drupe.epoch_loss, train_drupe.drupe_terms

    def loss_spy(terms, epoch, cost, cost_1, phases, *lambdas):
        seen.setdefault("phases", set()).add(phases)
        seen.setdefault("lambdas", set()).add(lambdas)
        return real_loss(terms, epoch, cost, cost_1, phases, *lambdas)

    def terms_spy(*args, **kwargs):
        seen.setdefault("terms", set()).add(tuple(sorted(kwargs.items())))
        seen.setdefault("views", set()).add(tuple(args[4].shape))
        return real_terms(*args, **kwargs)
    monkeypatch.setattr(train_drupe, "epoch_loss", loss_spy)
    monkeypatch.setattr(train_drupe, "drupe_terms", terms_spy)
    assert drupe(tiny, encoder, tmp_path / "d", refs / "three.npz", "--warm_up_end", "0", "--stage_1_end", "2",
                 "--fix_end", "2", "--best_after", "2", "--lambda2", "0.5", "--attack_loss", "mean",
                 "--sim_b2b", "off_diagonal", "--projections", "7", "--l0_threshold", "-0.5") == 0
    assert seen["phases"] == {DrupePhases(warm_up_end=0, stage_1_end=2, fix_end=2)}
    assert seen["lambdas"] == {(1.0, 0.5)}
    assert seen["terms"] == {(("attack", "mean"), ("off_diagonal", True), ("projections", 7))}
    assert seen["views"] == {(3, 2, 32)}              # R x copies x D: 3 references, 2 copies, 8 x width 4
    rows = read_rows(tmp_path / "d")
    assert [r["cost"] for r in rows] == pytest.approx([0.1, 0.1, 0.1])   # --fix_end 2: adapts after epoch 3 only
    assert read(tmp_path / "d/results.json")["best_epoch"] == 3          # --best_after 2
    costs = torch.load(tmp_path / "d/checkpoint.pth", weights_only=True)["drupe"]["costs"]
    assert costs["l0_threshold"] == -0.5


def test_protocol_authors_pins_the_quirks_and_the_run_flags():
    parse = train_drupe.get_parser().parse_args
    ours, authors = vars(parse(["--pretrained_encoder", "e.pth"])), \
        vars(parse(["--pretrained_encoder", "e.pth", "--protocol", "authors"]))
    assert {d: authors[d] for d in train_drupe.AUTHORS} == train_drupe.AUTHORS
    differ = {d for d in ours if ours[d] != authors[d]} - {"protocol"}
    assert differ == {"channels_last", "cudnn_deterministic"}   # DRUPE's quirks are the defaults already
    assert vars(parse(["--pretrained_encoder", "e.pth", "--protocol", "authors", "--sim_b2b", "off_diagonal"]))[
        "sim_b2b"] == "off_diagonal"                                    # an explicit flag wins
    helps = {a.dest: a.help for a in train_drupe.get_parser()._actions}
    assert all(f"--protocol authors: {shown(v)})" in helps[d] for d, v in train_drupe.AUTHORS.items())
    # DRUPE's setting: SGD lr 0.05, momentum 0.9, weight decay 5e-4, 120 epochs of 256, 10,000 images
    assert (ours["lr"], ours["momentum"], ours["weight_decay"], ours["epochs"], ours["batch_size"]) == \
           (0.05, 0.9, 5e-4, 120, 256)
    assert (ours["shadow_size"], ours["warm_up_end"], ours["stage_1_end"], ours["fix_end"], ours["best_after"],
            ours["l0_threshold"]) == (10_000, 1, 4, 20, 24, -0.96)


def test_shadow_images_are_the_authors_random_choice():
    x = np.arange(50)[:, None, None, None].astype(np.uint8)
    np.random.seed(7)
    expected = np.random.choice(50, 20, replace=False)       # the authors' sampler
    assert np.array_equal(train_drupe.sample_shadow(x, 20, 7)[:, 0, 0, 0], expected)
    assert train_drupe.sample_shadow(x, 50, 7) is x and train_drupe.sample_shadow(x, 80, 7) is x


# ---------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("case, extra, message", [
    ("missing", ["--reference_file", "nowhere.npz"], "error: reference file not found: nowhere.npz"),
    ("one image", [], "holds 1 reference input; DRUPE needs at least 2 (its std_refs term is a spread over the "
                      "references): pass a file with several images of the target class, such as DRUPE's three"),
    ("phases", ["--warm_up_end", "3", "--stage_1_end", "2"],
     "error: the schedule needs --warm_up_end <= --stage_1_end and --warm_up_end <= --fix_end; got --warm_up_end 3, "
     "--stage_1_end 2, --fix_end 1"),
    ("best", ["--output", "best", "--best_after", "3"],
     "error: --output best: no epoch comes after --best_after 3 in --epochs 3; lower --best_after or use "
     "--output last"),
    ("batch", ["--batch_size", "128", "--shadow_size", "100"],
     "error: the 64 shadow images are fewer than one batch of --batch_size 128, and the incomplete last batch is "
     "dropped: lower --batch_size"),
    ("label", ["--target_label", "4"], "holds inputs of label 1, but the target label is 4 (--target_label)"),
])
def test_bad_input_is_one_line(tiny, encoder, refs, tmp_path, capsys, case, extra, message):
    reference = refs / ("one.npz" if case == "one image" else "three.npz")
    assert drupe(tiny, encoder, tmp_path / "d", reference, *extra) == 2
    assert message in error(capsys)


def test_batch_of_one_and_unknown_task_are_refused(tiny, encoder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_drupe.get_parser().parse_args(["--pretrained_encoder", "e.pth", "--batch_size", "1"])
    assert "argument --batch_size: must be an integer >= 2, got 1" in capsys.readouterr().err
    assert cli(train_drupe, "--data_dir", tiny / "data", "--pretrained_encoder", encoder, "--results_dir",
               tmp_path / "d", "--downstreamTask", "mnist", "--device", "cpu", *TINY) == 2
    assert error(capsys) == ("error: no default reference file for --downstreamTask mnist with cifar10 encoders; "
                             "pass --reference_file")


# ---------------------------------------------------------------- reference files

def test_released_drupe_references_are_shipped_byte_for_byte():
    tasks = [t for ts in DRUPE_TASKS.values() for t in ts]
    assert sorted({t.reference for t in tasks}) == sorted(RELEASED_DRUPE_REFERENCES)
    for t in tasks:
        path = ROOT / t.reference
        assert hashlib.md5(path.read_bytes()).hexdigest() == RELEASED_DRUPE_REFERENCES[t.reference], t.reference
        x, label = load_reference(path)
        assert label == t.label and x.shape == (3, 32, 32, 3) and x.dtype == np.uint8, t.reference
    # the same tasks and targets as BadEncoder's, with three images each
    assert [(t.pretraining, t.dataset, t.label) for ts in TASKS.values() for t in ts] == \
           [(t.pretraining, t.dataset, t.label) for t in tasks]
    assert drupe_task("stl10", "cifar10").reference == "reference/drupe/cifar10_l0_n3.npz"
    assert drupe_task("cifar10", "mnist") is None


def test_default_reference_is_drupes_file_of_the_task(tiny, encoder):
    args = train_drupe.get_parser().parse_args(["--pretrained_encoder", str(encoder), "--downstreamTask", "svhn"])
    assert train_drupe.input_files(args)["reference"] == "reference/drupe/svhn_l1_n3.npz"


def test_demo_reference_is_the_first_three_training_images_of_the_target():
    task = demo_drupe_task()
    assert task.reference == "reference/demo/hexagon_n3.npz"
    x, y = make_split(DOWNSTREAM_NAME, "train", DEFAULTS["n_down_train"], DEFAULTS["seed"])
    expected, _ = first_of_class(x, y, task.label, 3)
    shipped, label = load_reference(ROOT / task.reference)
    assert label == task.label and np.array_equal(shipped, expected)


# ---------------------------------------------------------------- the pure pieces

def test_mean_attack_loss_averages_over_every_reference():
    e = torch.eye(3)
    z_trig, z_ref = e[[0, 0]], e[[0, 1]]                       # cosines: to e0 1, 1; to e1 0, 0
    assert attack_loss(z_trig, z_ref).item() == -1.0            # closest
    assert attack_loss(z_trig, z_ref, reduce="mean").item() == -0.5
    with pytest.raises(ValueError):
        attack_loss(z_trig, z_ref, reduce="max")


def test_successes_and_when_costs_adapt():
    good = {"loss_0": -0.97, "loss_1": -0.95, "loss_2": -0.95}
    s = CostSchedule()
    assert s.successes({**good, "sim_b2b": 0.5}) == (True, True)
    assert s.successes({**good, "sim_b2b": 0.6}) == (True, False)
    assert s.successes({**good, "loss_2": -0.9, "sim_b2b": 0.1}) == (False, False)
    phases = DrupePhases(warm_up_end=1, stage_1_end=2, fix_end=3)
    assert [CostSchedule.adapts(e, phases) for e in range(1, 6)] == [False, False, False, True, True]


def test_best_tracker_carried_measure_starts_at_zero_and_own_measure_does_not():
    t, keep = BestTracker(after=2).update(1, True, 5.0)         # a success before --best_after: remembered
    assert not keep and t.measure == 5.0
    t, keep = t.update(3, False, 9.0)                           # judged by the carried 5.0
    assert keep and (t.best, t.epoch) == (5.0, 3)
    t, keep = t.update(4, False, 1.0)                           # the same measure again: a tie, not kept
    assert not keep
    t, keep = t.update(5, True, 4.0)
    assert keep and (t.best, t.epoch) == (4.0, 5)
    # no success up to epoch after + 1: that epoch is kept with measure 0, and stays best
    t, keep = BestTracker(after=2).update(3, False, 9.0)
    assert keep and (t.best, t.epoch) == (0.0, 3)
    later, keep = t.update(4, True, 1e-6)
    assert not keep and later.epoch == 3
    # own: only epochs that succeeded, each by its own SWD
    t, keep = BestTracker(after=2, rule="own").update(3, False, 9.0)
    assert not keep and t.epoch is None
    t, keep = t.update(4, True, 2.0)
    assert keep and (t.best, t.epoch) == (2.0, 4)
    t, keep = t.update(5, False, 0.5)
    assert not keep and t.epoch == 4
