"""The baseline defences (defenses.py): fine-tuning, fine-pruning and NAD on tiny data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import defenses
import train_clean_encoder
from datasets import load_split, normalization
from datasets.loader import extract_features, to_input
from models import SimCLR, encoder_checkpoint, load_encoder
from models.pruning import channel_ranking, prune_channels, prune_mask, prune_until
from utils.errors import UserError
from utils.files import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def args(tiny, suspect, out, defense, *extra):
    return defenses.get_parser().parse_args(
        ["--defense", defense, "--suspect", str(suspect), "--data_dir", str(tiny / "data"), "--results_dir", str(out),
         "--ratio", "0.5", "--batch_size", "16", "--epochs", "2", "--nad_teacher_epochs", "1", "--device", "cpu",
         *map(str, extra)])


def run(tiny, suspect, out, defense, *extra):
    defenses.main(args(tiny, suspect, out, defense, *extra))
    return out


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def layer4(model, x):
    """layer4's output (BxCxHxW) in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(x, return_blocks=True)[2][3]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs here are compared with each other only, and on a shared 2-core machine one thread
    trains these tiny networks several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    torch.manual_seed(3)
    model = SimCLR(width=8)
    path = tmp_path_factory.mktemp("suspect") / "suspect.pth"
    save_checkpoint(path, encoder_checkpoint(model, epoch=200))
    return path


@pytest.fixture(scope="module")
def finetuned(tiny, suspect, tmp_path_factory):
    """Fine-tuning for 2 epochs, the run the other defences are compared with."""
    return run(tiny, suspect, tmp_path_factory.mktemp("ft") / "ft", "finetune")


# ---------------------------------------------------------------- pruning, by hand

def test_ranking_is_by_mean_activation_and_mask_prunes_exactly_the_least_active():
    means = torch.tensor([0.5, 0.1, 0.9, 0.0, 0.3])
    acts = means.view(1, 5, 1, 1).repeat(2, 1, 2, 2)                 # 2 images, 5 channels, 2x2
    acts[0, 1, 0, 0] += 4.0                                           # channel 1: one large peak ...
    acts[1, 1] -= 0.5                                                 # ... yet mean 0.1 + 0.5 - 0.25 = 0.35
    order = channel_ranking(acts)
    assert order.tolist() == [3, 4, 1, 0, 2]
    assert prune_mask(order, 0.0).all()
    assert (~prune_mask(order, 0.4)).nonzero().flatten().tolist() == [3, 4]
    assert (~prune_mask(order, 0.6)).nonzero().flatten().tolist() == [1, 3, 4]
    assert channel_ranking(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).tolist() == [1, 3, 0, 2]    # ties: index order


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_pruned_layer4_channels_are_exactly_zero_for_any_input_in_both_modes(arch):
    torch.manual_seed(0)
    model, channels = SimCLR(arch, width=4), [0, 5, 7, 12]
    prune_channels(model, channels)
    x = torch.randn(4, 3, 32, 32) * 3
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x, return_blocks=True)[2][3]
        assert torch.all(out[:, channels] == 0)
        kept = [c for c in range(out.shape[1]) if c not in channels]
        assert (out[:, kept] != 0).any(dim=(0, 2, 3)).float().mean() > 0.5


def test_no_gradient_reaches_the_pruned_entries():
    torch.manual_seed(0)
    model, channels = SimCLR(width=4), [1, 2, 30]
    prune_channels(model, channels)
    _, z = model(torch.randn(8, 3, 32, 32))
    z.pow(2).sum().backward()
    for name in ("0.bn2", "1.bn2", "0.downsample.1"):
        norm = model.f.f[6].get_submodule(name)
        assert torch.all(norm.weight.grad[channels] == 0) and torch.all(norm.bias.grad[channels] == 0)
        assert norm.weight.grad.abs().sum() > 0


def test_prune_until_stops_at_the_first_count_beyond_the_drop():
    acc = [90.0, 90.0, 88.0, 85.0, 89.0, 89.0]
    best, curve = prune_until(list(range(6)), acc.__getitem__, max_drop=3)
    assert best == 2 and curve == [(0, 90.0), (1, 90.0), (2, 88.0), (3, 85.0)]    # no look past 3
    assert prune_until(list(range(6)), acc.__getitem__, max_drop=3, step=2)[1] == [(0, 90.0), (2, 88.0), (4, 89.0)]
    assert prune_until(list(range(6)), lambda k: 50.0, max_drop=0)[0] == 5         # never every channel


# ---------------------------------------------------------------- the defences against fine-tuning

def test_finetune_with_zero_epochs_returns_the_suspect(tiny, suspect, tmp_path):
    out = run(tiny, suspect, tmp_path / "ft0", "finetune", "--epochs", "0")
    assert same(weights(out / "model_0.pth"), weights(suspect))
    res = json.loads((out / "results.json").read_text())
    assert res["encoder"] == "model_0.pth" and res["clean_images"] == 32      # relative to the folder
    assert load_encoder(out / "model_0.pth")[1]["defense"] == "finetune"


def test_finetune_trains_the_backbone_and_head(suspect, finetuned):
    before, after = weights(suspect), weights(finetuned / "model_2.pth")
    assert not torch.equal(before["f.f.0.weight"], after["f.f.0.weight"])
    assert not torch.equal(before["g.3.weight"], after["g.3.weight"])
    rows = [json.loads(r) for r in (finetuned / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)


def test_fine_pruning_at_fraction_zero_changes_nothing(tiny, suspect, finetuned, tmp_path):
    out = run(tiny, suspect, tmp_path / "fp0", "fine_pruning", "--prune_fraction", "0", "--epochs", "0")
    assert same(weights(out / "model_0.pth"), weights(suspect))
    assert json.loads((out / "results.json").read_text())["pruned_channels"] == []
    out = run(tiny, suspect, tmp_path / "fp0_2", "fine_pruning", "--prune_fraction", "0")
    assert same(weights(out / "model_2.pth"), weights(finetuned / "model_2.pth"))


def test_fine_pruning_prunes_the_least_active_channels_and_a_plain_load_stays_pruned(tiny, suspect, tmp_path):
    model, _ = load_encoder(suspect)
    subset = load_split(tiny / "data", "cifar10", "train")[0][:32]
    mean = layer4(model, to_input(subset, *normalization("cifar10"), "cpu")).mean(dim=(0, 2, 3))      # C = 64
    expected = torch.argsort(mean)[:16].tolist()                                                     # 0.25 x 64

    pruned_only = run(tiny, suspect, tmp_path / "prune", "fine_pruning", "--prune_fraction", "0.25", "--epochs", "0")
    ckpt = torch.load(pruned_only / "model_0.pth", weights_only=True)
    assert ckpt["pruned_channels"] == expected and ckpt["pruning"] == {"rule": "fraction", "fraction": 0.25}
    changed = {k for k, v in weights(suspect).items() if not torch.equal(v, ckpt["state_dict"][k])}
    assert changed <= {f"f.f.6.{i}" for i in ("0.bn2.weight", "0.bn2.bias", "1.bn2.weight", "1.bn2.bias",
                                               "0.downsample.1.weight", "0.downsample.1.bias")}

    tuned = run(tiny, suspect, tmp_path / "fp", "fine_pruning", "--prune_fraction", "0.25")
    x = torch.randn(8, 3, 32, 32)
    for path in (pruned_only / "model_0.pth", tuned / "model_2.pth"):
        out = layer4(load_encoder(path)[0], x)
        assert torch.all(out[:, expected] == 0), path
        assert (out.sum(dim=(0, 2, 3)) != 0).sum() > 32                       # the rest stays alive
    assert not torch.equal(weights(suspect)["f.f.0.weight"], weights(tuned / "model_2.pth")["f.f.0.weight"])


def test_knn_drop_rule_follows_liu_et_al(tiny, suspect, tmp_path):
    out = run(tiny, suspect, tmp_path / "knn", "fine_pruning", "--prune_max_drop", "5", "--knn_k", "10",
              "--epochs", "0")
    res = json.loads((out / "results.json").read_text())
    curve, count = res["pruning"]["knn_curve"], len(res["pruned_channels"])
    base = curve[0][1]
    assert [k for k, _ in curve] == list(range(len(curve)))                        # one channel at a time
    assert all(acc >= base - 5 for k, acc in curve if k <= count)
    assert count == 63 or (curve[-1][0] == count + 1 and curve[-1][1] < base - 5)  # stopped at the first drop

    model, _ = load_encoder(suspect)
    train_x, train_y = load_split(tiny / "data", "cifar10", "train")
    test, norm = load_split(tiny / "data", "cifar10", "test"), normalization("cifar10")
    order = channel_ranking(extract_features(model, train_x[:32], *norm, "cpu", normalized=False)).tolist()
    assert res["pruned_channels"] == order[:count]
    for k, acc in (curve[0], curve[-1]):    # each point is the accuracy of the pruned network itself
        pruned = load_encoder(suspect)[0]
        prune_channels(pruned, order[:k])
        assert acc == pytest.approx(train_clean_encoder.evaluate(pruned, train_x[32:], train_y[32:], *test, *norm,
                                                                 "cpu", 10, 0.5), abs=1e-4)


def test_nad_with_zero_weights_equals_finetune_and_its_teacher_is_a_finetune_run(tiny, suspect, finetuned, tmp_path):
    out = run(tiny, suspect, tmp_path / "nad0", "nad", "--nad_weights", "0", "0", "0", "0")
    assert same(weights(out / "model_2.pth"), weights(finetuned / "model_2.pth"))
    short = run(tiny, suspect, tmp_path / "ft1", "finetune", "--epochs", "1")
    assert same(weights(out / "teacher/model_1.pth"), weights(short / "model_1.pth"))
    res = json.loads((out / "results.json").read_text())
    assert res["teacher"] == str(out / "teacher/model_1.pth")
    assert json.loads((out / "teacher/results.json").read_text())["role"] == "NAD teacher"


def test_nad_attention_weights_change_the_student(tiny, suspect, finetuned, tmp_path):
    out = run(tiny, suspect, tmp_path / "nad", "nad", "--nad_weights", "0", "0", "1000", "5000")
    assert not same(weights(out / "model_2.pth"), weights(finetuned / "model_2.pth"))
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["at"] > 0 and r["loss"] == pytest.approx(r["nce"] + r["at"]) for r in rows)
    assert torch.load(out / "model_2.pth", weights_only=True)["nad_weights"] == [0.0, 0.0, 1000.0, 5000.0]


@pytest.mark.parametrize("defense, extra", [("finetune", []), ("fine_pruning", ["--prune_fraction", "0.25"]),
                                            ("nad", ["--nad_weights", "0", "100", "0", "5000"])])
def test_each_defence_resumes_bit_identically(tiny, suspect, tmp_path, defense, extra):
    full = run(tiny, suspect, tmp_path / "full", defense, *extra)
    run(tiny, suspect, tmp_path / "cut", defense, *extra, "--epochs", "1")         # stopped after epoch 1
    cut = run(tiny, suspect, tmp_path / "cut", defense, *extra, "--resume")
    assert same(weights(full / "model_2.pth"), weights(cut / "model_2.pth"))
    a = torch.load(full / "model_2.pth", weights_only=True)["optimizer"]["state"]
    b = torch.load(cut / "model_2.pth", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    assert [json.loads(r)["epoch"] for r in (cut / "log.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------- errors

def test_errors_are_one_line(tiny, suspect, tmp_path):
    with pytest.raises(UserError, match=r"the clean subset \(32 images = 0.5 x 64\) is smaller than one batch of 64"):
        defenses.main(args(tiny, suspect, tmp_path / "a", "finetune", "--batch_size", "64"))
    with pytest.raises(UserError, match="--ratio 1 leaves none: lower --ratio"):
        defenses.main(args(tiny, suspect, tmp_path / "b", "fine_pruning", "--ratio", "1", "--prune_max_drop", "2"))
    proc = subprocess.run([sys.executable, "defenses.py", "--defense", "nad", "--suspect", str(tmp_path / "none.pth"),
                           "--data_dir", str(tiny / "data"), "--results_dir", str(tmp_path / "c"), "--device", "cpu",
                           "--ratio", "0.5", "--batch_size", "16"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: checkpoint not found: {tmp_path / 'none.pth'}\n"
    proc = subprocess.run([sys.executable, "defenses.py", "--defense", "fine_pruning", "--suspect", "x.pth",
                           "--prune_fraction", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --prune_fraction: must be a finite number in [0, 1), got 1" in proc.stderr
