"""Two processes under torchrun (gloo, CPU) compute what one process computes at the global batch.

The step tests run tests/ddp_cases.py under torchrun once and compare each process's results
with the same functions run here in one process. The script tests run the three training stages
under torchrun on tiny data.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddp_cases
from datasets import save_split
from utils.errors import UserError
from utils.stage import start_run

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
TRIGGER = "trigger/trigger_pt_white_21_10_ap_replace.npz"
# Weight tolerance after one step: float32 sums run in another order in two processes, so the
# updates agree to this fraction of the largest weight change, not bit for bit.
STEP_RTOL = 1e-4


def launch(args, nproc=2, check=True):
    """python -m torch.distributed.run --standalone --nproc_per_node nproc <args>; returns the process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():      # gloo over loopback, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_single(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}                  # the thread count of each torchrun process
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def max_change(after, before, keys):
    return max((after[k] - before[k]).abs().max().item() for k in keys)


def assert_same_step(two, one, before, keys):
    """The weights after the two-process step equal the one-process step up to STEP_RTOL."""
    diff = max_change(two, one, keys)
    moved = max_change(one, before, keys)
    assert moved > 0
    assert diff <= STEP_RTOL * moved, (diff, moved)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_cases")
    launch(["tests/ddp_cases.py", out])
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def parameter_names(model):
    return [name for name, _ in model.named_parameters()]


def test_nt_xent_loss_of_two_processes_equals_one_process_at_the_global_batch(ranks):
    loss, _ = ddp_cases.simclr_step(train=False)            # one process, all 8 images
    for r in ranks:
        assert abs(r["simclr_eval"][0] - loss) <= 1e-5, (r["simclr_eval"][0], loss)


def test_weights_after_one_step_are_identical_on_both_ranks_and_match_one_process(ranks):
    _, one = ddp_cases.simclr_step(train=False)
    before = ddp_cases.simclr(1, train=False).state_dict()
    keys = list(one)
    assert all(torch.equal(ranks[0]["simclr_eval"][1][k], ranks[1]["simclr_eval"][1][k]) for k in keys)
    assert_same_step(ranks[0]["simclr_eval"][1], one, before, keys)


def test_plain_batchnorm_normalises_over_each_process_share(ranks):
    """Without --sync_bn, BatchNorm in training mode uses each process's own images: two processes
    equal one process that runs the model on each share separately, not on the whole batch."""
    per_share_loss, per_share = ddp_cases.simclr_step(train=True, per_process_reference=True)
    global_loss, _ = ddp_cases.simclr_step(train=True)
    for r in ranks:
        assert abs(r["simclr_train"][0] - per_share_loss) <= 1e-5
    assert abs(global_loss - per_share_loss) > 1e-4            # the statistics do matter
    params = parameter_names(ddp_cases.simclr(1, train=True))
    assert all(torch.equal(ranks[0]["simclr_train"][1][k], ranks[1]["simclr_train"][1][k]) for k in params)
    assert_same_step(ranks[0]["simclr_train"][1], per_share, ddp_cases.simclr(1, train=True).state_dict(), params)


def test_mimic_step_of_two_processes_equals_one_process(ranks):
    terms, one = ddp_cases.mimic_step()
    for r in ranks:
        for key, value in terms.items():
            assert r["mimic"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    keys = list(one)
    assert all(torch.equal(ranks[0]["mimic"][1][k], ranks[1]["mimic"][1][k]) for k in keys)
    assert_same_step(ranks[0]["mimic"][1], one, ddp_cases.simclr(2, train=False).state_dict(), keys)


def test_each_process_gets_its_rows_of_the_global_batch_views(ranks):
    """Batch k of process r is rows r, r+2, ... of batch k of one process with twice the batch."""
    one = ddp_cases.loader_views(ddp_cases.GLOBAL_BATCH)
    for rank, r in enumerate(ranks):
        assert len(r["views"]) == len(one) == 2
        for (v1, v2), (g1, g2) in zip(r["views"], one):
            assert torch.allclose(v1, g1[rank::2], atol=1e-6) and torch.allclose(v2, g2[rank::2], atol=1e-6)


def test_sync_bn_on_cpu_is_refused_with_a_reason(ranks):
    assert ranks[0]["sync_bn_error"].startswith("--sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU")


def test_single_process_stage_refuses_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = type("Args", (), {"device": "cpu", "results_dir": str(tmp_path), "overwrite": False, "seed": 0})()
    with pytest.raises(UserError, match="runs in one process; launch it with python, not torchrun"):
        start_run(args)


# ---------------------------------------------------------------- the scripts under torchrun

def log_rows(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny):
    """Stage 0, 1 and 2 with two processes (batch 8 each), and the references they are compared with."""
    data = ["--data_dir", tiny / "data", "--device", "cpu"]
    out = tiny / "ddp"
    procs = {}
    procs["clean"] = launch(["train_clean_encoder.py", "--results_dir", out / "clean", "--epochs", "2",
                             "--batch_size", "8", "--width", "4", *data])
    launch(["train_clean_encoder.py", "--results_dir", out / "clean_resumed", "--epochs", "1",
            "--batch_size", "8", "--width", "4", *data])
    launch(["train_clean_encoder.py", "--results_dir", out / "clean_resumed", "--epochs", "2",
            "--batch_size", "8", "--width", "4", "--resume", *data])
    # One step (16 shadow images): over several steps this width-4 encoder amplifies float rounding to
    # ~1% of the weight change (one process with 1 vs 2 threads differs as much), which would hide
    # what the test compares; after one step the two runs agree to ~1e-5 of the change.
    first = np.load(tiny / "data/cifar10/train.npz")
    save_split(tiny / "data/shadow16/train.npz", first["x"][:16], first["y"][:16])
    bad = ["train_badencoder.py", "--trigger_file", TRIGGER, "--reference_file", tiny / "priority.npz",
           "--pretrained_encoder", out / "clean/model_2.pth", "--shadow_dataset", "shadow16", "--epochs", "1",
           "--lr", "0.05", *data]
    procs["bad"] = launch([*bad, "--results_dir", out / "bad", "--batch_size", "8"])
    run_single([*bad, "--results_dir", out / "bad_single", "--batch_size", "16"])
    mimic = ["MIMIC.py", "--teacher", out / "bad/model_1.pth", "--ratio", "0.5", "--epochs", "2",
             "--mi_epochs", "3", *data]
    procs["mimic"] = launch([*mimic, "--results_dir", out / "mimic", "--batch_size", "8"])
    run_single([*mimic, "--results_dir", out / "mimic_single", "--batch_size", "16"])
    return out, procs


EXPECTED_FILES = {"args.json", "log.jsonl", "log.csv", "checkpoint.pth", "results.json"}


def test_two_process_runs_write_one_set_of_outputs(runs):
    out, procs = runs
    for stage, epochs, extra in (("clean", 2, set()), ("bad", 1, set()), ("mimic", 2, {"mi.json"})):
        folder = out / stage
        assert {p.name for p in folder.iterdir()} == EXPECTED_FILES | extra | {f"model_{epochs}.pth"}, stage
        assert [row["epoch"] for row in log_rows(folder)] == list(range(1, epochs + 1)), stage
        assert procs[stage].stdout.count("git: ") == 1, stage          # only rank 0 prints
        assert json.loads((folder / "args.json").read_text())["batch_size"] == 8


def test_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    out, _ = runs
    whole = torch.load(out / "clean/model_2.pth")["state_dict"]
    resumed = torch.load(out / "clean_resumed/model_2.pth")["state_dict"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert log_rows(out / "clean")[-1]["loss"] == log_rows(out / "clean_resumed")[-1]["loss"]


def test_badencoder_on_two_processes_equals_one_process_at_the_global_batch(runs):
    """BadEncoder freezes BatchNorm, so an epoch at batch 2x8 matches an epoch at batch 16."""
    out, _ = runs
    before = torch.load(out / "clean/model_2.pth")["state_dict"]
    two = torch.load(out / "bad/model_1.pth")["state_dict"]
    one = torch.load(out / "bad_single/model_1.pth")["state_dict"]
    keys = [k for k in one if k.startswith("f.") and one[k].is_floating_point()]
    assert_same_step(two, one, before, keys)
    assert log_rows(out / "bad")[0]["loss"] == pytest.approx(log_rows(out / "bad_single")[0]["loss"], abs=1e-5)


def test_mimic_on_two_processes_shares_out_the_mi_and_every_rank_uses_the_same_weights(runs):
    out, _ = runs
    two = json.loads((out / "mimic/mi.json").read_text())
    one = json.loads((out / "mimic_single/mi.json").read_text())
    assert len(two["mi"]) == len(two["history"]) == 4
    assert two["mi"] == pytest.approx(one["mi"], abs=1e-6)      # each block estimated with --seed alone
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-3)
    results = json.loads((out / "mimic/results.json").read_text())
    assert list(results["attention_weights"].values()) == two["weights"]


def test_batch_size_is_per_process_in_messages(monkeypatch):
    import utils.distributed
    assert utils.distributed.global_batch(64) == (64, "64")
    monkeypatch.setattr(utils.distributed, "get_world_size", lambda: 4)
    assert utils.distributed.global_batch(64) == (256, "64 x 4 processes")


def test_torchvision_augmentation_under_torchrun_needs_workers(monkeypatch):
    import numpy as np

    import datasets.loader as loader
    monkeypatch.setattr(loader, "get_world_size", lambda: 2)
    images = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=r"--augment torchvision under torchrun needs --num_workers >= 1, so that "
                                        r"each process's workers draw their own augmentations"):
        loader.ViewLoader(images, 4, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), augment="torchvision")
    loader.ViewLoader(images, 4, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), augment="torchvision", num_workers=1)
