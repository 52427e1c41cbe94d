"""DECREE's trigger search (models/decree.py) and its stage (detect.py), on hand-made encoders and
tiny files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import detect
from datasets import NORMALIZATION, load_split
from datasets.loader import to_input
from models import SimCLR, encoder_checkpoint, load_encoder
from models.decree import (NO_TRIGGER_L1, LambdaState, SearchState, Settings, Trigger, lr_at, mask_from, mask_l1,
                           next_lambda, pattern_from, pl1, record_step, search_epoch, self_cosine, should_stop, stamp,
                           to_param, verdict)
from utils.cli import run_cli
from utils.files import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs here are compared with each other only; one thread runs these tiny networks faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the parameterisation and the loss terms

def test_mask_and_pattern_stay_in_range_whatever_the_parameters():
    w = torch.cat([torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4], dtype=torch.float64), 10 * torch.randn(200).double()])
    mask, pattern = mask_from(w), pattern_from(w)
    assert mask.min() >= 0 and mask.max() <= 1 and pattern.min() >= 0 and pattern.max() <= 255
    assert mask[0] == 0 and mask[4] == 1 and mask[2] == 0.5            # the clip catches 1 + 2.5e-8
    assert pattern[4] == 255 and pattern[2] == 127.5
    unit = torch.rand(100, dtype=torch.float64)
    assert torch.allclose(mask_from(to_param(unit)), unit, atol=1e-12)  # the parameters are tanh pre-images
    trigger = Trigger(32, 32, torch.Generator().manual_seed(0))
    m, p = trigger()
    assert m.shape == (32, 32) and p.shape == (32, 32, 3) and m.dtype == torch.float64
    assert 0.45 < m.mean() < 0.55 and 0.45 * 255 < p.mean() < 0.55 * 255       # uniform starts


def test_stamp_l1_cosine_and_pl1_by_hand():
    images = torch.full((2, 2, 2, 3), 100.0, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    pattern = torch.full((2, 2, 3), 255.0, dtype=torch.float64)
    out = stamp(images, mask, pattern)
    assert out[0, 0, 0].tolist() == [255.0] * 3 and out[0, 0, 1].tolist() == [100.0] * 3
    assert out[1, 1, 0].tolist() == [177.5] * 3                        # (1 - 0.5) * 100 + 0.5 * 255
    assert mask_l1(mask).item() == 4.5                                 # 3 channels x 1.5
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert self_cosine(z).item() == pytest.approx((0 + 2 * 2 ** -0.5) / 3)   # 3 pairs: 0, 1/sqrt2, 1/sqrt2
    assert self_cosine(torch.ones(5, 3)).item() == pytest.approx(1.0)
    assert pl1(300.0, 32, 32) == pytest.approx(100 / 1024)             # a full 10x10 square on 32x32
    assert verdict(0.05, 0.1) == "backdoored" and verdict(0.1, 0.1) == "clean"
    assert verdict(pl1(NO_TRIGGER_L1, 32, 32), 0.1) == "clean"


def test_learning_rate_steps_at_the_authors_epochs():
    assert [lr_at(e, 0.5) for e in (1, 30, 31, 50, 51, 1000)] == [0.5, 0.5, 0.1, 0.1, 0.05, 0.05]


# ---------------------------------------------------------------- lambda

def run_lambda(results, state, s=Settings()):
    values = []
    for success in results:
        state = next_lambda(state, success, s)
        values.append(state.value)
    return state, values


def test_lambda_schedule_on_a_made_up_sequence():
    s = Settings()
    state = LambdaState(s.lambda_init)
    # 6 successes: raised at the sixth (more than 5 in a row), then the count starts again
    state, values = run_lambda([True] * 6, state)
    assert values == pytest.approx([1e-3] * 5 + [5e-3]) and state.up == 0
    # a failure breaks the run of successes; 6 failures cut lambda at the sixth
    state, values = run_lambda([True] * 5 + [False] * 6, state)
    assert values == pytest.approx([5e-3] * 10 + [1e-3])
    # 18 failures: cut three times, to 8e-6, the first value below lambda_min; 6 more leave it there
    state, values = run_lambda([False] * 24, state)
    assert values[5] == pytest.approx(2e-4) and values[11] == pytest.approx(4e-5)
    assert values[17:] == pytest.approx([8e-6] * 7)
    # below lambda_min a run of successes counts towards the reset, but the raise after 6 lifts lambda
    # back above lambda_min first: from the authors' start the reset is never reached
    held = []
    for _ in range(12):
        state = next_lambda(state, True, s)
        held.append(state.held)
    assert held == [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0] and state.value == pytest.approx(2e-4)   # raised twice
    # from a lambda far below lambda_min (which the authors' start never reaches), 11 successes reset it
    state, values = run_lambda([True] * 11, LambdaState(1e-7))
    assert values[5] == pytest.approx(5e-7) and values[9] == pytest.approx(5e-7) and values[10] == 1e-3
    assert (state.up, state.down) == (1, 0)                            # the reset zeroes both, then counts
    # no raise from lambda_max
    state, values = run_lambda([True] * 6, LambdaState(1e5))
    assert values[-1] == 1e5


def test_best_trigger_and_early_stop_counter_on_a_made_up_sequence():
    s = Settings()
    state = SearchState.start(s)
    mask, pattern = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64)
    stale, best = [], []
    #           fail        best        worse       fail        best       failing step with a smaller L1
    for cos, l1 in ((0.5, 10.0), (0.995, 100.0), (-0.999, 120.0), (0.98, 50.0), (0.991, 90.0), (0.9, 1.0)):
        record_step(state, cos, l1, mask + l1, pattern, epoch=1, s=s)
        stale.append(state.stale)
        best.append(state.best_l1)
    assert stale == [0, 0, 1, 2, 0, 1]                  # counted once a trigger exists; a new best restarts it
    assert best == [NO_TRIGGER_L1, 100.0, 100.0, 100.0, 90.0, 90.0]
    assert state.best_mask[0, 0] == 90.0                 # the mask of the step that gave the best L1
    state.stale = 10
    assert not should_stop(0.995, state, s)              # the counter must exceed 10
    state.stale = 11
    assert should_stop(-0.995, state, s) and not should_stop(0.98, state, s)   # and the epoch's |cos| pass 0.99


# ---------------------------------------------------------------- the search on hand-made encoders

SIZE, TOP, SIDE = 16, 10, 4         # a 4x4 patch at rows and columns 10..13 of 16x16 images


class PatchEncoder(nn.Module):
    """A stand-in for an encoder's backbone f: a fixed random projection of the image, so the
    embeddings of different images differ (mean pairwise cosine about 0.2). With backdoor=True a
    gate, open when the 4x4 patch is bright, blends the embedding into one fixed vector: images
    carrying a white patch all map (nearly) to it (cosine above 0.999)."""

    def __init__(self, backdoor=True, dim=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * SIZE * SIZE, dim, generator=g) / (3 * SIZE * SIZE) ** 0.5)
        self.register_buffer("target", 3 * F.normalize(torch.randn(dim, generator=g), dim=0))
        self.backdoor = backdoor

    def f(self, x):
        """Bx3xHxW in [0, 1] -> BxD."""
        v = (x - 0.5).flatten(1) @ self.proj
        if not self.backdoor:
            return v
        brightness = x[:, :, TOP:TOP + SIDE, TOP:TOP + SIDE].mean((1, 2, 3)).unsqueeze(1)
        gate = torch.sigmoid(10 * (brightness - 0.7))
        return (1 - gate) * v + gate * self.target


def search(encoder, epochs=300):
    """The search as detect.py runs it, on 64 random 16x16 images in batches of 32. The early stop
    is off: with the authors' patience (10 steps) the search stops on its first success, a mask
    over much of the image, long before it finds the patch (about epoch 220 here)."""
    s = Settings(stop_patience=10 ** 6)
    images = torch.randint(0, 200, (64, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(1)).double()
    trigger = Trigger(SIZE, SIZE, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(trigger.parameters(), lr=0.5, betas=(0.5, 0.9))
    state = SearchState.start(s)
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, 0.5)
        batches = torch.randperm(64, generator=torch.Generator().manual_seed(epoch)).split(32)
        search_epoch(lambda x: encoder.f(x.float()), images, batches, trigger, optimizer, state, epoch, s)
    return state


def test_search_finds_the_patch_of_a_backdoored_encoder_and_not_of_a_random_one():
    images = torch.randint(0, 200, (64, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1)) / 255
    triggered = images.clone()
    triggered[:, :, TOP:TOP + SIDE, TOP:TOP + SIDE] = 1
    bad, plain = PatchEncoder(), PatchEncoder(backdoor=False)
    assert self_cosine(bad.f(images)) < 0.3 and self_cosine(bad.f(triggered)) > 0.999
    assert self_cosine(plain.f(triggered)) < 0.5

    found = search(bad)
    box = found.best_mask[TOP:TOP + SIDE, TOP:TOP + SIDE]
    assert found.found and found.best_l1 == pytest.approx(mask_l1(found.best_mask).item())
    assert 0.6 * SIDE ** 2 < found.best_mask.sum() < 1.2 * SIDE ** 2           # about the patch's 16 pixels
    assert box.sum() > 0.85 * found.best_mask.sum()                             # ... and where the patch is
    assert found.best_pattern[TOP:TOP + SIDE, TOP:TOP + SIDE].mean() > 200      # white where it matters
    score = pl1(found.best_l1, SIZE, SIZE)
    assert score == pytest.approx(SIDE ** 2 / SIZE ** 2, rel=0.4)               # 0.0625
    assert verdict(score, detect.THRESHOLD) == "backdoored"

    random = search(plain)
    assert pl1(random.best_l1, SIZE, SIZE) > 5 * score
    assert verdict(pl1(random.best_l1, SIZE, SIZE), detect.THRESHOLD) == "clean"


def test_state_round_trips_through_a_checkpoint_dict(tmp_path):
    s = Settings()
    state = SearchState.start(s)
    assert not state.found and state.best_l1 == NO_TRIGGER_L1
    state.lam, state.best_l1, state.best_mask = LambdaState(2e-4, 1, 0, 0), 12.5, torch.rand(4, 4).double()
    state.best_pattern, state.best_epoch, state.stale = torch.rand(4, 4, 3).double(), 3, 7
    torch.save(state.to_dict(), tmp_path / "s.pth")
    back = SearchState.from_dict(torch.load(tmp_path / "s.pth", weights_only=True))
    assert back.lam == state.lam and back.best_l1 == 12.5 and back.stale == 7 and back.best_epoch == 3
    assert torch.equal(back.best_mask, state.best_mask) and torch.equal(back.best_pattern, state.best_pattern)


# ---------------------------------------------------------------- the shadow data

def test_shadow_data_is_the_first_images_of_each_class_in_file_order():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 1, 0])
    assert detect.shadow_indices(labels, 2).tolist() == [0, 1, 2, 3, 4, 6]
    assert detect.shadow_indices(labels, 10).tolist() == list(range(9))
    cifar_like = np.repeat(np.arange(10), 1000)
    np.random.default_rng(0).shuffle(cifar_like)
    chosen = detect.shadow_indices(cifar_like)                       # the authors' 10% of each class
    assert len(chosen) == 1000 and np.bincount(cifar_like[chosen]).tolist() == [100] * 10
    assert all(np.sum(cifar_like[:i + 1] == cifar_like[i]) <= 100 for i in chosen)   # the first 100 of each
    assert len(detect.shadow_indices(np.repeat(np.arange(10), 800))) == 800    # STL-10: 80 per class
    assert len(detect.shadow_indices(np.zeros(7, dtype=int))) == 1             # rounded up


# ---------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("decree") / "encoder.pth"
    save_checkpoint(path, encoder_checkpoint(SimCLR(width=4), epoch=10))
    return path


def stage_args(tiny, encoder, out, *extra):
    return detect.get_parser().parse_args(
        ["--encoder", str(encoder), "--data_dir", str(tiny / "data"), "--results_dir", str(out),
         "--shadow_per_class", "10", "--batch_size", "16", "--epochs", "4", "--stop_patience", "1000",
         "--device", "cpu", *map(str, extra)])


def run_stage(tiny, encoder, out, *extra):
    detect.main(stage_args(tiny, encoder, out, *extra))
    return json.loads((out / "results.json").read_text())


def test_stage_end_to_end(tiny, encoder, tmp_path):
    out = tmp_path / "run"
    res = run_stage(tiny, encoder, out, "--threshold", "0.9")
    assert res["stage"] == "decree" and res["epochs"] == 4 and res["shadow_images"] == 32
    assert res["encoder"] == str(encoder.resolve())
    assert res["fingerprint"]["stage"] == "decree" and "encoder" in res["fingerprint"]["inputs"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and res["final"] == rows[-1]
    # a fresh width-4 encoder embeds all images alike already: a trigger is found
    assert res["trigger_found"] and 0 < res["l1"] < 3 * 32 * 32
    assert res["pl1"] == pytest.approx(res["l1"] / (3 * 32 * 32))
    x, _ = load_split(tiny / "data", "cifar10", "test")                 # all 32 images: 10 per class covers them
    model, _ = load_encoder(encoder)
    with torch.no_grad():
        feats = model.eval().f(to_input(x, *NORMALIZATION["cifar10"], "cpu"))
    assert res["clean_cos"] == pytest.approx(self_cosine(feats).item(), abs=1e-5)
    assert res["verdict"] == ("backdoored" if res["pl1"] < 0.9 else "clean") and res["threshold"] == 0.9
    with np.load(out / "trigger.npz") as saved:
        mask, pattern = saved["mask"], saved["pattern"]
    assert mask.shape == (32, 32) and pattern.shape == (32, 32, 3)
    assert 3 * mask.sum() == pytest.approx(res["l1"])
    sheet = np.asarray(Image.open(out / "trigger.png"))
    assert sheet.shape == (128, 3 * 128 + 16, 3)                       # three 4x panels, two 8-px gaps
    assert np.array_equal(sheet[:, :128, 0], np.round(mask * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "decree" and ckpt["epoch"] == 4 and ckpt["search"]["best_l1"] == res["l1"]


def test_stage_without_a_trigger_reports_the_authors_placeholder(tiny, encoder, tmp_path):
    # a similarity no trigger reaches in one epoch
    res = run_stage(tiny, encoder, tmp_path / "none", "--epochs", "1", "--cos_threshold", "0.999999")
    assert not res["trigger_found"] and res["l1"] == NO_TRIGGER_L1 and res["verdict"] == "clean"
    assert res["trigger_image"] is None and not (tmp_path / "none/trigger.png").exists()


def test_interrupted_search_resumes_bit_for_bit(tiny, encoder, tmp_path):
    full = run_stage(tiny, encoder, tmp_path / "full")
    run_stage(tiny, encoder, tmp_path / "cut", "--epochs", "2")                 # stopped after epoch 2
    cut = run_stage(tiny, encoder, tmp_path / "cut", "--resume")
    for key in ("l1", "pl1", "best_epoch", "verdict", "epochs", "trigger_found"):
        assert cut[key] == full[key], key
    a = torch.load(tmp_path / "full/checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
               for k in a["optimizer"]["state"])
    assert {k: v for k, v in a["search"].items() if not torch.is_tensor(v)} == \
           {k: v for k, v in b["search"].items() if not torch.is_tensor(v)}
    assert torch.equal(a["search"]["best_mask"], b["search"]["best_mask"])
    rows = [json.loads(line) for line in (tmp_path / "cut/log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["cos"] for r in rows] == [json.loads(line)["cos"] for line in
                                        (tmp_path / "full/log.jsonl").read_text().splitlines()]


def test_a_stopped_search_stays_stopped_on_resume(tiny, encoder, tmp_path):
    out = tmp_path / "stop"
    first = run_stage(tiny, encoder, out, "--stop_patience", "1", "--epochs", "30")
    assert first["stopped_early"] and first["epochs"] < 30
    again = run_stage(tiny, encoder, out, "--stop_patience", "1", "--epochs", "30", "--resume")
    assert again["epochs"] == first["epochs"] and again["l1"] == first["l1"]


def test_protocol_authors_sets_only_the_run_flags():
    ours = vars(detect.get_parser().parse_args(["--encoder", "e.pth"]))
    authors = vars(detect.get_parser().parse_args(["--encoder", "e.pth", "--protocol", "authors"]))
    differ = {k for k in ours if ours[k] != authors[k]}
    assert differ == {"protocol", "channels_last", "cudnn_deterministic"}
    assert (authors["amp"], authors["channels_last"], authors["cudnn_deterministic"]) == ("off", "off", "on")
    assert (ours["lr"], ours["batch_size"], ours["epochs"], ours["cos_threshold"]) == (0.5, 128, 1000, 0.99)
    assert (ours["lr_drop_epochs"], ours["lr_drops"], ours["stop_patience"]) == ([30, 50], [0.1, 0.05], 10)


# ---------------------------------------------------------------- errors

def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(detect.main, detect.get_parser(), [str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_errors_are_one_line(tiny, encoder, tmp_path, capsys):
    common = ["--data_dir", tiny / "data", "--device", "cpu", "--batch_size", "16"]
    missing = tmp_path / "none.pth"
    assert error_line(["--encoder", missing, "--results_dir", tmp_path / "a", *common], capsys) == \
        f"error: checkpoint not found: {missing}"
    assert error_line(["--encoder", encoder, "--results_dir", tmp_path / "b", *common, "--shadow_per_class", "1"],
                      capsys) == ("error: the shadow data (9 images: 1 per class of cifar10/test) are fewer than "
                                  "one batch of --batch_size 16: lower --batch_size or raise --shadow_per_class")
    line = error_line(["--encoder", encoder, "--results_dir", tmp_path / "c", "--data_dir", tmp_path], capsys)
    assert line.startswith(f"error: dataset file not found: {tmp_path / 'cifar10/test.npz'}")
    assert error_line(["--encoder", encoder, "--results_dir", tmp_path / "d", *common, "--lr_drop_epochs", "50", "30"],
                      capsys) == "error: --lr_drop_epochs 50 30: the second epoch must not come before the first"
    assert error_line(["--encoder", encoder, "--results_dir", tmp_path / "e", *common, "--resume"], capsys) == \
        f"error: --resume: no checkpoint.pth in {tmp_path / 'e'} to continue from"
    run_stage(tiny, encoder, tmp_path / "f", "--epochs", "1")
    line = error_line(["--encoder", encoder, "--results_dir", tmp_path / "f", *common, "--shadow_per_class", "10",
                       "--epochs", "4", "--stop_patience", "1000", "--lr", "0.1", "--resume"], capsys)
    assert line.startswith(f"error: --resume: these flags differ from the run in {tmp_path / 'f'}: --lr 0.5 -> 0.1;")
    proc = subprocess.run([sys.executable, "detect.py", "--encoder", "e.pth", "--batch_size", "1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --batch_size: must be an integer >= 2, got 1" in proc.stderr


def test_a_single_image_batch_is_skipped_not_nan():
    """The authors' mean over the pairs of a batch of one image is NaN; such a last batch is skipped."""
    s = Settings()
    images = torch.randint(0, 200, (5, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(1)).double()
    trigger = Trigger(SIZE, SIZE, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(trigger.parameters(), lr=0.5, betas=(0.5, 0.9))
    state = SearchState.start(s)
    row = search_epoch(lambda x: PatchEncoder().f(x.float()), images, list(torch.arange(5).split(4)), trigger,
                       optimizer, state, 1, s)
    assert np.isfinite(row["loss"]) and torch.isfinite(trigger.mask_param).all()
