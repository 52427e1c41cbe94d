"""The runner over several seeds, with the baseline defences and on the user's own data.

The summary is checked on hand-made seed folders; resuming, the defences' rows and the data
checks on a stand-in for the stage subprocess (FakeStages writes what each script would); one tiny
real run goes from a folder of PNG images to summary.md.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_pipeline
from datasets import load_reference, load_split, save_split
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# ACC and ASR (%) the fake downstream stage reports per encoder folder; seed s adds s % 10 to ACC
# and twice that to ASR.
FAKE_METRICS = {"clean": (80.0, 5.0), "badencoder": (78.0, 99.0), "mimic": (75.0, 10.0),
                "no_teacher": (60.0, 8.0), "uniform": (72.0, 30.0), "finetune": (76.0, 60.0),
                "fine_pruning": (74.0, 40.0), "nad": (73.0, 35.0)}
FAKE_CONVERGENCE = ["converged", "rising", "converged", "converged"]


def flag(args, name):
    """The value after the last occurrence of a flag (later flags win, as in argparse)."""
    return args[len(args) - 1 - args[::-1].index(name) + 1]


class FakeStages:
    """Stands in for run_pipeline.run_child: records each stage command and writes what the script
    would: results.json naming model_1.pth (and the file), mi.json for MIMIC, metrics for stage 3."""

    def __init__(self):
        self.commands = []

    def __call__(self, cmd):
        script = next(c for c in cmd if c.endswith(".py"))
        args = cmd[cmd.index(script) + 1:]
        self.commands.append((script, args))
        out, seed = Path(flag(args, "--results_dir")), int(flag(args, "--seed"))
        out.mkdir(parents=True, exist_ok=True)
        if script == "training_downstream_classifier.py":
            folder = Path(flag(args, "--encoder")).parent.name.removesuffix("_" + flag(args, "--dataset"))
            acc, asr = FAKE_METRICS[folder]
            results = {"acc": acc + seed % 10, "asr": asr + 2 * (seed % 10), "asr_excluding_target": asr}
        else:
            (out / "model_1.pth").write_bytes(b"weights")
            results = {"encoder": "model_1.pth"}
        if script == "MIMIC.py":
            (out / "mi.json").write_text(json.dumps({
                "blocks": ["layer1", "layer2", "layer3", "layer4"], "mi": [0.5, 0.25, 1.0, 2.0],
                "weights": [1.0, 2.0, 3.0, 4.0],
                "convergence": [{"converged": r == "converged", "reason": r} for r in FAKE_CONVERGENCE]}))
        (out / "results.json").write_text(json.dumps(results))
        return 0

    def scripts(self):
        return [script for script, _ in self.commands]


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(run_pipeline, "run_child", stages)
    monkeypatch.setattr(run_pipeline, "draw_figures", lambda *a: [])
    return stages


def own_data_args(data_root, tmp_path, *extra, pretraining="cifar10", task="gtsrb:1"):
    """Runner flags for datasets under data_root/data as the user's own (the tiny fixture's gtsrb has labels 0..4)."""
    return run_pipeline.get_parser().parse_args(
        ["--pretraining_dataset", pretraining, "--task", task, "--data_dir", str(data_root / "data"),
         "--reference_dir", str(tmp_path / "ref"), "--results_dir", str(tmp_path / "out"), "--device", "cpu",
         *extra])


# ---------------------------------------------------------------- the summary over seeds

def test_summary_over_hand_made_seed_folders(tmp_path):
    task = "gtsrb (target 12)"
    rows = {1: {"clean": (80.0, 4.0), "backdoored": (79.0, 98.0), "MIMIC": (70.0, 10.0),
                "no-teacher control": (60.0, 9.0), "FT": (75.0, 50.0)},
            2: {"clean": (82.0, 6.0), "backdoored": (81.0, 96.0), "MIMIC": (74.0, 14.0),
                "no-teacher control": (61.0, 12.0), "FT": (71.0, 20.0)}}
    for seed, encoders in rows.items():
        mi = {task: {"layer1": {"mi": 0.5, "weight": 100.0, "convergence": "converged"},
                     "layer2": {"mi": 0.25, "weight": 50.0, "convergence": "noisy" if seed == 2 else "converged"}}}
        summary = {"preset": "paper", "seed": seed, "total_seconds": 10.0 * seed, "mi": mi,
                   "results": {task: {e: {"acc": a, "asr": r, "asr_excluding_target": r} for e, (a, r) in encoders.items()}},
                   "checks": [{"check": f"seed {seed} check", "passed": seed == 1}]}
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "summary.json").write_text(json.dumps(summary))

    per_seed = {s: run_pipeline.read_summary(tmp_path / f"seed_{s}") for s in (1, 2)}
    summary, text = run_pipeline.seed_summary(per_seed)
    summary = json.loads(json.dumps(summary))          # as summary.json holds it

    mimic = summary["stats"][task]["MIMIC"]
    assert mimic["acc"] == {"values": {"1": 70.0, "2": 74.0}, "mean": 72.0, "std": pytest.approx(2 ** 1.5)}
    assert mimic["asr"]["mean"] == 12.0 and mimic["asr"]["std"] == pytest.approx(2 ** 1.5)
    paired = summary["paired_differences"][task]
    assert list(paired) == ["no-teacher control", "FT"]                 # not clean, not backdoored
    assert paired["FT"]["asr"]["values"] == {"1": -40.0, "2": -6.0}      # MIMIC minus FT, same seed
    assert paired["FT"]["asr"]["mean"] == -23.0
    assert paired["FT"]["asr"]["std"] == pytest.approx(34 / 2 ** 0.5)
    assert paired["no-teacher control"]["acc"]["mean"] == 11.5
    assert summary["checks"] == {"1": [{"check": "seed 1 check", "passed": True}],
                                 "2": [{"check": "seed 2 check", "passed": False}]}
    assert summary["mi_not_converged"] == [{"seed": 2, "task": task, "block": "layer2", "convergence": "noisy"}]
    assert summary["seed_seconds"] == {"1": 10.0, "2": 20.0}

    assert "| MIMIC | 72.0 ± 2.8 | 1: 70.0, 2: 74.0 | 12.0 ± 2.8 | 1: 10.0, 2: 14.0 |" in text
    assert "| gtsrb (target 12): FT | -1.0 ± 5.7 | 1: -5.0, 2: 3.0 | -23.0 ± 24.0 | 1: -40.0, 2: -6.0 |" in text
    assert "### Demo checks, seed 1\n\n- [x] seed 1 check" in text and "- [ ] seed 2 check" in text
    assert f"| 2 | {task} | layer2 | 0.25 | 50 | noisy |" in text
    assert f"**MI estimate not converged** in 1 block(s): seed 2, {task}, layer2 (noisy)" in text


# ---------------------------------------------------------------- runs with a stand-in for the stages

def test_seeds_resume_without_redoing_finished_seeds(tiny, tmp_path, fake, capsys):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "--no_controls"))
    out = tmp_path / "out"
    per_seed = len(fake.commands) // 2
    assert per_seed == 12          # clean, BadEncoder, MIMIC, FT, FP, NAD + 6 evaluations
    assert not (out / "clean").exists() and (out / "seed_2" / "clean" / "model_1.pth").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    mimic_acc = summary["stats"]["gtsrb (target 1)"]["MIMIC"]["acc"]
    assert mimic_acc["values"] == {"1": 76.0, "2": 77.0} and mimic_acc["mean"] == 76.5
    assert summary["paired_differences"]["gtsrb (target 1)"]["FT"]["acc"]["mean"] == -1.0
    assert summary["mi"]["1"]["gtsrb (target 1)"]["layer2"] == {"mi": 0.25, "weight": 2.0, "convergence": "rising"}
    assert len(summary["mi_not_converged"]) == 2          # layer2 of each seed

    # A re-run reads the finished seeds' summaries back: no stage runs, and a hand edit shows through.
    seed_1 = out / "seed_1" / "summary.json"
    edited = json.loads(seed_1.read_text())
    edited["results"]["gtsrb (target 1)"]["MIMIC"]["acc"] = 70.0
    seed_1.write_text(json.dumps(edited))
    capsys.readouterr()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "--no_controls"))
    assert len(fake.commands) == 2 * per_seed
    assert "== seed 1: done earlier" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stats"]["gtsrb (target 1)"]["MIMIC"]["acc"]["values"] == {"1": 70.0, "2": 77.0}

    # A third seed runs only its own stages; a stage folder removed from seed 2 runs that stage again.
    shutil.rmtree(out / "seed_2" / "eval" / "nad_gtsrb")
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "3", "--no_controls"))
    new = [(flag(args, "--seed"), Path(flag(args, "--results_dir"))) for _, args in fake.commands[2 * per_seed:]]
    assert new[0] == ("2", out / "seed_2" / "eval" / "nad_gtsrb")
    assert len(new) == 1 + per_seed
    assert all(seed == "3" and folder.is_relative_to(out / "seed_3") for seed, folder in new[1:])
    assert json.loads((out / "summary.json").read_text())["seeds"] == [1, 2, 3]


def test_defences_get_a_row_each_beside_mimic(tiny, tmp_path, monkeypatch, capsys):
    fake = FakeStages()                                  # and real figures: a plotting failure must only warn
    monkeypatch.setattr(run_pipeline, "run_child", fake)

    def broken(results_dir):
        raise RuntimeError("no display")
    monkeypatch.setattr(run_pipeline, "plot_results", broken)
    run_pipeline.main(own_data_args(tiny, tmp_path, "--preset", "demo"))
    out = tmp_path / "out"

    summary = json.loads((out / "summary.json").read_text())            # one seed: today's layout
    rows = summary["results"]["gtsrb (target 1)"]
    assert list(rows) == ["clean", "backdoored", "MIMIC", "no-teacher control", "uniform-weights control",
                          "FT", "FP", "NAD"]
    assert rows["FP"] == {"acc": 74.0, "asr": 40.0, "asr_excluding_target": 40.0}
    assert "checks" not in summary                      # the demo's checks are for the demo's data
    text = (out / "summary.md").read_text()
    assert "| FT | 76.00 | 60.00 | 60.00 |" in text and "| NAD | 73.00 | 35.00 | 35.00 |" in text
    assert "| 100 | gtsrb (target 1) | layer2 | 0.25 | 2 | rising |" in text
    assert "**MI estimate not converged** in 1 block(s): seed 100, gtsrb (target 1), layer2 (rising)" in text

    suspect = str(out / "badencoder_gtsrb" / "model_1.pth")
    defences = {flag(a, "--defense"): a for s, a in fake.commands if s == "defenses.py"}
    mimic_args = next(a for s, a in fake.commands if s == "MIMIC.py")
    assert list(defences) == ["finetune", "fine_pruning", "nad"]
    for name, args in defences.items():
        assert flag(args, "--suspect") == suspect and flag(args, "--pretraining_dataset") == "cifar10"
        # the demo preset's baseline budget, on MIMIC's clean subset
        assert [flag(args, f) for f in ("--epochs", "--ratio", "--lr", "--batch_size")] == ["10", "0.2", "1e-3", "128"]
        assert flag(args, "--ratio") == flag(mimic_args, "--ratio")
        assert flag(args, "--results_dir") == str(out / f"{name}_gtsrb")
        assert ("--nad_teacher_epochs" in args) == (name == "nad")
    evaluated = [Path(flag(a, "--results_dir")).name for s, a in fake.commands if s == "training_downstream_classifier.py"]
    assert evaluated[-3:] == ["finetune_gtsrb", "fine_pruning_gtsrb", "nad_gtsrb"]
    assert not any("--encoder_usage_info" in args for _, args in fake.commands)

    # The reference file made for the task is the first train image of label 1.
    x, y = load_split(tiny / "data", "gtsrb", "train")
    ref_x, ref_label = load_reference(tmp_path / "ref" / "cifar10" / "gtsrb_1.npz")
    assert ref_label == 1 and np.array_equal(ref_x, x[np.flatnonzero(y == 1)[:1]])

    printed = capsys.readouterr().out
    assert "warning: figures not drawn (RuntimeError: no display)" in printed
    assert (out / "figures" / "samples.png").is_file()                  # the sample grid still drawn


def test_defences_flag_chooses_what_runs(tiny, tmp_path, fake):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "nad", "--no_controls"))
    assert "MIMIC.py" not in fake.scripts()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["results"]["gtsrb (target 1)"]) == ["clean", "backdoored", "NAD"]
    assert summary["mi"] == {}
    with pytest.raises(SystemExit):
        run_pipeline.get_parser().parse_args(["--defenses", "mimic,pruning"])


# ---------------------------------------------------------------- checks before any work

def test_task_with_an_absent_label_is_refused_before_any_work(tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, task="gtsrb:7")
    with pytest.raises(UserError, match=rf"^label 7 does not occur in {tiny}/data/gtsrb/test\.npz \(its labels "
                                        r"run from 0 to 4\)$"):
        run_pipeline.main(args)
    assert fake.commands == [] and not (tmp_path / "out").exists() and not (tmp_path / "ref").exists()


def test_missing_data_and_a_trigger_of_another_size_are_named(tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, task="mine:1")
    with pytest.raises(UserError, match=rf"^this run needs prepared data; missing: {tiny}/data/mine/train\.npz, "
                                        rf"{tiny}/data/mine/test\.npz\. Create it with: python prepare_data\.py "
                                        rf"--image_folder DIR --name mine --out {tiny}/data$"):
        run_pipeline.main(args)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        save_split(tmp_path / "data" / "small" / f"{split}.npz", rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                   np.arange(8) % 2)
    args = own_data_args(tmp_path, tmp_path, pretraining="small", task="small:1")
    with pytest.raises(UserError, match=rf"^the trigger {run_pipeline.TRIGGER} is 32x32 pixels but the images of "
                                        rf"{tmp_path}/data/small/train\.npz are 16x16"):
        run_pipeline.main(args)
    assert fake.commands == []


def test_paper_preset_runs_a_subset_of_its_tasks(tmp_path):
    parser = run_pipeline.get_parser()
    args = parser.parse_args(["--preset", "paper", "--tasks", "svhn", "--data_dir", str(tmp_path),
                              "--results_dir", str(tmp_path / "out")])
    assert run_pipeline.select_data(args, run_pipeline.PAPER) == (
        "cifar10", [{"dataset": "svhn", "label": 1, "reference": "reference/cifar10/one.npz"}])
    with pytest.raises(UserError) as refused:
        run_pipeline.main(args)
    message = str(refused.value)
    assert "svhn/train.npz" in message and "cifar10/train.npz" in message
    assert "reference/" not in message                 # the released reference files are shipped
    assert "gtsrb" not in message and "stl10" not in message
    assert f"python prepare_data.py --dataset cifar10 svhn --download --out {tmp_path}" in message
    args.tasks = ["gtsrb", "mnist"]
    with pytest.raises(UserError, match=r"^--tasks: the paper preset has no task mnist \(its tasks: gtsrb, svhn, stl10\)$"):
        run_pipeline.main(args)


# ---------------------------------------------------------------- one real run on your own images

def test_own_images_end_to_end(tmp_path, capsys):
    """PNG class folders -> prepare_data.py --image_folder -> the runner on them, every stage a real
    subprocess (the runner itself runs in this process, to save one start of torch)."""
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "prepare_data.py", "--image_folder", str(tmp_path / "images"),
                           "--name", "mine", "--out", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    run_pipeline.main(run_pipeline.get_parser().parse_args(
        ["--pretraining_dataset", "mine", "--task", "mine:1", "--preset", "demo", "--data_dir", str(data),
         "--reference_dir", str(tmp_path / "ref"), "--results_dir", str(out), "--device", "cpu",
         "--clean_args", "--epochs 1 --width 4 --batch_size 16 --knn_freq 0",
         "--badencoder_args", "--epochs 1 --batch_size 16",
         "--mimic_args", "--epochs 1 --mi_epochs 2 --batch_size 16 --ratio 0.5",
         "--defenses", "mimic", "--no_controls", "--downstream_args", "--epochs 2"]))
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]["mine (target 1)"]
    assert list(rows) == ["clean", "backdoored", "MIMIC"]
    assert all(0 <= r[m] <= 100 for r in rows.values() for m in ("acc", "asr", "asr_excluding_target"))
    text = (out / "summary.md").read_text()
    for name in ("clean", "backdoored", "MIMIC"):
        assert f"| {name} | {rows[name]['acc']:.2f} | {rows[name]['asr']:.2f} |" in text
    mi = summary["mi"]["mine (target 1)"]
    assert list(mi) == ["layer1", "layer2", "layer3", "layer4"]
    assert all(b["convergence"] == "too few epochs" for b in mi.values())   # 2 MI epochs cannot settle
    assert "**MI estimate not converged** in 4 block(s)" in text
    assert (tmp_path / "ref" / "mine" / "mine_1.npz").is_file()
    assert (out / "figures" / "samples.png").is_file() and (out / "figures" / "acc_asr.png").is_file()
    assert str(out / "figures" / "samples.png") in capsys.readouterr().out
