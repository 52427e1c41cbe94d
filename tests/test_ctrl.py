"""CTRL beside BadEncoder: the trigger objects, the poisoning data step and its rounding, stage 3 with
the frequency trigger on a hand-made backdoor, and the runner's attacks x defences matrix (its
folders, its tables, resuming after a kill; once end to end through the real scripts)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
import run_pipeline
import training_downstream_classifier as stage3
from datasets import FrequencyTrigger, PatchTrigger, load_split, make_trigger, normalization_record, save_split
from datasets.frequency import dct2_windows, frequency_trigger, rgb_to_yuv
from datasets.poison import POISON_RECORD, poison_count, poison_ctrl, poison_indices
from datasets.trigger import stamp_trigger
from paper import TRIGGER
from pipeline import runner
from report.stats import asr_matrix, markdown_asr_matrix, summarize_seeds
from test_pipeline_runner import FAKE_METRICS, FakeStages, flag, read
from utils.cli import run_cli
from utils.errors import UserError
from utils.files import save_checkpoint
from utils.records import Results

ROOT = Path(__file__).resolve().parent.parent


def toy_data(data_dir, name="toy", n_train=64, n_test=32, classes=4, seed=0):
    """Random mid-range 32x32 images, labels 0..classes-1 in turn."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        save_split(Path(data_dir) / name / f"{split}.npz", rng.integers(30, 220, (n, 32, 32, 3), dtype=np.uint8),
                   np.arange(n) % classes)


# ---------------------------------------------------------------- the trigger objects

def test_both_triggers_apply_and_describe_themselves():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    patch = make_trigger("patch", ROOT / TRIGGER, image_size=(32, 32))
    assert isinstance(patch, PatchTrigger)
    assert np.array_equal(patch.apply(x), stamp_trigger(x, patch.t, patch.tm))
    assert (patch.apply(x)[:, 21:31, 21:31] == 255).all()
    assert patch.describe() == {"kind": "patch", "file": str(ROOT / TRIGGER), "patched_pixels": 100}

    ctrl = make_trigger("ctrl", image_size=(32, 32))
    assert isinstance(ctrl, FrequencyTrigger)
    assert np.array_equal(ctrl.apply(x), frequency_trigger(x))
    assert ctrl.describe() == {"kind": "ctrl", "magnitude": 100.0, "window_size": 32, "positions": [[15, 15], [31, 31]],
                               "channels": [1, 2], "color_space": "YUV (BT.601)",
                               "transform": "orthonormal 2-D DCT-II per window"}
    # magnitude 0: every pixel within 1/255 of the original
    assert np.abs(FrequencyTrigger(0.0).apply(x).astype(int) - x).max() <= 1
    with pytest.raises(UserError, match=r"CTRL trigger: window size 16 does not fit 32x32 images"):
        FrequencyTrigger(window_size=16, image_size=(32, 32))
    with pytest.raises(UserError, match="unknown trigger kind 'blend'"):
        make_trigger("blend")


# ---------------------------------------------------------------- poisoning

def test_poison_count_rounds_to_nearest_with_halves_up():
    assert poison_count(0.01, 50_000) == 500               # CTRL on CIFAR-10
    assert poison_count(0.01, 6000) == 60                  # the demo's pre-training set
    assert poison_count(0.01, 150) == 2                    # 1.5 -> 2
    assert poison_count(0.01, 149) == 1                    # 1.49 -> 1
    assert poison_count(0.29, 50) == 15                    # 14.5 exactly, though the float product is 14.4999...
    assert 0.29 * 50 < 14.5
    assert poison_count(0.01, 49) == 0
    with pytest.raises(UserError, match="rounds to 0 images"):
        poison_indices(np.zeros(49, dtype=int), 0, 0.01)
    with pytest.raises(UserError, match="asks for 5 images of the target class 3, but it has 4"):
        poison_indices(np.arange(16) % 4, 3, 0.3)


def test_poisoned_copy_touches_exactly_the_first_target_images_and_records_them(tmp_path):
    data = tmp_path / "data"
    toy_data(data, n_train=200, n_test=20, classes=5, seed=1)
    x, y = load_split(data, "toy", "train")
    record = poison_ctrl(data, "toy", "toy_ctrl", target_label=2, ratio=0.05)
    assert record["status"] == "written" and record["poisoned"] == 10 and record["images"] == 200

    px, py = load_split(data, "toy_ctrl", "train")
    assert np.array_equal(py, y)
    changed = np.flatnonzero((px != x).any(axis=(1, 2, 3)))
    assert changed.tolist() == np.flatnonzero(y == 2)[:10].tolist() == record["indices"]   # 2, 7, ..., 47
    assert (y[changed] == 2).all()
    assert np.array_equal(px[changed], frequency_trigger(x[changed]))
    assert (data / "toy_ctrl" / "test.npz").read_bytes() == (data / "toy" / "test.npz").read_bytes()
    on_disk = json.loads((data / "toy_ctrl" / POISON_RECORD).read_text())
    assert on_disk["indices"] == record["indices"] and on_disk["poison_ratio"] == 0.05
    assert on_disk["trigger"]["kind"] == "ctrl" and on_disk["target_label"] == 2 and on_disk["source"] == "toy"

    assert poison_ctrl(data, "toy", "toy_ctrl", 2, 0.05)["status"] == "kept"
    assert poison_ctrl(data, "toy", "toy_ctrl", 2, 0.1)["poisoned"] == 20        # other settings: written again
    with pytest.raises(UserError, match="needs its own name"):
        poison_ctrl(data, "toy", "toy", 2)

    # The same through prepare_data.py's flags.
    args = prepare_data.get_parser().parse_args(["--poison", "ctrl", "--poison_dataset", "toy", "--target_label", "4",
                                                 "--poison_ratio", "0.01", "--name", "toy_ctrl4", "--out", str(data)])
    prepare_data.main(args)
    assert json.loads((data / "toy_ctrl4" / POISON_RECORD).read_text())["indices"] == [4, 9]
    with pytest.raises(UserError, match="--poison needs --poison_dataset, --name and --target_label"):
        prepare_data.main(prepare_data.get_parser().parse_args(["--poison", "ctrl", "--name", "x", "--out", str(data)]))


def poison_cli(data, *extra):
    """prepare_data.py --poison ctrl of the tiny cifar10 copy in `data`, in this process; returns the exit code."""
    argv = ["--poison", "ctrl", "--poison_dataset", "cifar10", "--target_label", "1", "--poison_ratio", "0.05",
            "--out", str(data), *extra]
    try:
        run_cli(prepare_data.main, prepare_data.get_parser(), argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_a_poisoned_copy_never_overwrites_another_dataset(tiny, tmp_path, capsys):
    """Issue 37, item 2: --name gtsrb replaced the prepared GTSRB with poisoned CIFAR-10 (exit 0)."""
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    before = {f: (data / "gtsrb" / f).read_bytes() for f in ("train.npz", "test.npz")}
    assert poison_cli(data, "--name", "gtsrb") == 2
    assert capsys.readouterr().err == (f"error: {data}/gtsrb already holds a dataset (train.npz, test.npz), not a "
                                       f"poisoned copy; pass --force to replace it, or choose another --name\n")
    assert {f: (data / "gtsrb" / f).read_bytes() for f in before} == before
    assert poison_cli(data, "--name", "../../evil") == 2
    assert capsys.readouterr().err == ("error: dataset name '../../evil' must be a plain folder name (no path "
                                       "separators)\n")
    assert not (tmp_path.parent / "evil").exists()
    # an earlier poisoned copy is replaced by one of other settings; --force replaces a dataset
    assert poison_cli(data, "--name", "cifar10_ctrl") == 0
    assert poison_cli(data, "--name", "cifar10_ctrl", "--poison_ratio", "0.1") == 0
    assert json.loads((data / "cifar10_ctrl" / POISON_RECORD).read_text())["poisoned"] == 6
    assert poison_cli(data, "--name", "gtsrb", "--force") == 0
    assert json.loads((data / "gtsrb" / POISON_RECORD).read_text())["source"] == "cifar10"


@pytest.mark.parametrize("window", ["5", "64", "1", "16"])
def test_a_window_that_does_not_fit_is_one_line(tiny, window, capsys):
    """Issue 37, item 4: a ValueError traceback before; on 32x32 images only the whole image fits
    CTRL's positions (15, 15) and (31, 31)."""
    assert poison_cli(tiny / "data", "--name", "cifar10_w", "--ctrl_window", window) == 2
    assert capsys.readouterr().err == (
        f"error: CTRL trigger: window size {window} does not fit 32x32 images; the window must divide the height "
        f"and width and hold the DCT positions (15, 15), (31, 31) (so be at least 32): here 32\n")
    assert not (tiny / "data" / "cifar10_w").exists()


def test_a_trigger_of_magnitude_zero_is_refused(tiny, capsys):
    """Issue 37, item 9: a 'poisoned' copy equal to its source was written without a word."""
    assert poison_cli(tiny / "data", "--name", "cifar10_m0", "--ctrl_magnitude", "0") == 2
    assert capsys.readouterr().err == ("error: --ctrl_magnitude 0 changes no image: the poisoned copy would equal "
                                       "cifar10; pass a non-zero magnitude (CTRL's is 100)\n")
    assert not (tiny / "data" / "cifar10_m0").exists()


# ---------------------------------------------------------------- stage 3 with the CTRL trigger

def test_stage3_with_the_ctrl_trigger_gives_the_hand_computed_asr(tmp_path, monkeypatch):
    """Class c images are flat grey 60 + 40c; the fake encoder's feature is the class from the
    brightness (the trigger changes no DC coefficient), or, for the backdoored encoder, the target
    whenever DCT coefficient (15, 15) of U exceeds 50 (the trigger adds 100 there)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, n in (("train", 40), ("test", 20)):
        y = np.arange(n) % 4
        x = (60 + 40 * y[:, None, None, None] + rng.integers(-3, 4, (n, 32, 32, 3))).astype(np.uint8)
        save_split(data / "grey" / f"{split}.npz", x, y)
    test_x, _ = load_split(data, "grey", "test")
    seen = []

    def fake_features(backdoored):
        def extract(encoder, images, mean, std, device, desc=""):
            seen.append(images)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
            cls = ((x.mean(dim=(1, 2, 3)) - 60) / 40).round().long().clamp(0, 3)
            if backdoored:
                cls[dct2_windows(rgb_to_yuv(x), 32)[:, 1, 15, 15] > 50] = 1
            return 5 * torch.nn.functional.one_hot(cls, 4).float()
        return extract

    ckpt = {"normalization": normalization_record("grey", (0.5,) * 3, (0.25,) * 3)}
    monkeypatch.setattr(stage3, "load_encoder", lambda path: (torch.nn.Identity(), ckpt))
    asr = {}
    for name in ("clean", "backdoored"):
        monkeypatch.setattr(stage3, "extract_features", fake_features(name == "backdoored"))
        seen.clear()
        out = tmp_path / name
        stage3.main(stage3.get_parser().parse_args(
            ["--dataset", "grey", "--reference_label", "1", "--trigger", "ctrl", "--encoder", "unused.pth",
             "--data_dir", str(data), "--results_dir", str(out), "--device", "cpu", "--epochs", "60", "--lr", "1e-2"]))
        assert np.array_equal(seen[2], FrequencyTrigger().apply(test_x))      # train, test, triggered test
        results = Results.load(out / "results.json")
        assert results.trigger == FrequencyTrigger().describe()
        asr[name] = results
    assert asr["clean"].acc == 100.0 and asr["backdoored"].acc == 100.0
    assert asr["clean"].asr == 25.0 and asr["clean"].asr_excluding_target == 0.0    # only the target's own 5 of 20
    assert asr["backdoored"].asr == 100.0 and asr["backdoored"].asr_excluding_target == 100.0


# ---------------------------------------------------------------- the matrix

CTRL_TASK, BAD_TASK = "CTRL: toy (target 2)", "toy (target 1)"


COPY = "toy_ctrl_t2_p0.1_m100_w32"      # the poisoned copy matrix_args asks for (pipeline.data.poison_name)


def matrix_args(data, tmp_path, *extra):
    return run_pipeline.get_parser().parse_args(
        ["--pretraining_dataset", "toy", "--task", "toy:1", "--attacks", "badencoder,ctrl", "--ctrl_target", "2",
         "--ctrl_poison_ratio", "0.1", "--data_dir", str(data), "--reference_dir", str(tmp_path / "ref"),
         "--results_dir", str(tmp_path / "out"), "--device", "cpu", *extra])


@pytest.fixture
def fake_matrix(monkeypatch):
    for folder, metrics in (("ctrl", (77.0, 90.0)), ("mimic_ctrl", (74.0, 12.0)), ("finetune_ctrl", (75.0, 70.0))):
        monkeypatch.setitem(FAKE_METRICS, folder, metrics)
    stages = FakeStages()
    monkeypatch.setattr(runner, "start_child", stages)
    monkeypatch.setattr(run_pipeline, "draw_figures", lambda *a: [])
    return stages


def test_matrix_runs_every_cell_into_its_own_folder(tmp_path, fake_matrix, capsys):
    data = tmp_path / "data"
    toy_data(data)
    run_pipeline.main(matrix_args(data, tmp_path, "--defenses", "mimic,finetune", "--no_controls"))
    out = tmp_path / "out"
    folders = [Path(flag(a, "--results_dir")).relative_to(out).as_posix() for _, a in fake_matrix.commands]
    assert sorted(folders) == sorted(["clean", "badencoder_toy", "mimic_toy", "finetune_toy", "eval/clean_toy",
                       "eval/backdoored_toy", "eval/mimic_toy", "eval/finetune_toy", "ctrl_toy", "mimic_ctrl_toy",
                       "finetune_ctrl_toy", "eval/clean_ctrl_toy", "eval/backdoored_ctrl_toy", "eval/mimic_ctrl_toy",
                       "eval/finetune_ctrl_toy"])
    commands = dict(zip(folders, (a for _, a in fake_matrix.commands)))
    ctrl = commands["ctrl_toy"]
    assert flag(ctrl, "--pretraining_dataset") == COPY and flag(ctrl, "--encoder_usage") == "toy"
    assert flag(commands["mimic_ctrl_toy"], "--pretraining_dataset") == "toy"          # the defender's clean data
    assert flag(commands["finetune_ctrl_toy"], "--suspect") == str(out / "ctrl_toy" / "model_1.pth")
    evaluation = commands["eval/finetune_ctrl_toy"]
    assert flag(evaluation, "--trigger") == "ctrl" and flag(evaluation, "--dataset") == "toy"
    assert flag(evaluation, "--reference_label") == "2" and "--reference_file" not in evaluation
    assert flag(commands["eval/clean_ctrl_toy"], "--encoder") == str(out / "clean" / "model_1.pth")
    assert "--trigger" not in commands["eval/finetune_toy"]
    assert json.loads((data / COPY / POISON_RECORD).read_text())["indices"] == [2, 6, 10, 14, 18, 22]
    poisoned = data / COPY / "train.npz"
    assert json.loads((out / "ctrl_toy" / "runner.json").read_text())["inputs"][str(poisoned)] == \
        runner.file_hash(poisoned)

    summary = read(out / "summary.json")
    assert list(summary["results"]) == [BAD_TASK, CTRL_TASK]
    assert summary["results"][CTRL_TASK]["backdoored"] == {"acc": 77.0, "asr": 90.0, "asr_excluding_target": 90.0}
    assert summary["attacks"][CTRL_TASK] == {"attack": "ctrl", "task": "toy (target 2)"}
    matrix = summary["asr_matrix"]
    assert list(matrix) == ["BadEncoder on toy (target 1)", "CTRL on toy (target 2)"]
    assert {m: c["mean"] for m, c in matrix["CTRL on toy (target 2)"].items()} == {
        "clean": 5.0, "backdoored": 90.0, "mimic": 12.0, "finetune": 70.0}
    assert list(summary["mi"]) == [BAD_TASK, CTRL_TASK]
    text = (out / "summary.md").read_text()
    assert "### BadEncoder: toy (target 1)" in text and f"### {CTRL_TASK}" in text
    assert "| attack | clean | backdoored | MIMIC | FT |" in text
    assert "| BadEncoder on toy (target 1) | 5.0 | 99.0 | 10.0 | 60.0 |" in text
    assert "| CTRL on toy (target 2) | 5.0 | 90.0 | 12.0 | 70.0 |" in text

    # Other poisoning: a second copy beside the first (two runs sharing --data_dir never rewrite each
    # other's); CTRL's stage 0 and everything after it run again, nothing of BadEncoder's.
    before = poisoned.read_bytes()
    capsys.readouterr()
    run_pipeline.main(matrix_args(data, tmp_path, "--defenses", "mimic,finetune", "--no_controls",
                                  "--ctrl_poison_ratio", "0.2"))
    assert sorted(Path(flag(a, "--results_dir")).name for _, a in fake_matrix.commands[15:]) == sorted(
        ["ctrl_toy", "mimic_ctrl_toy", "finetune_ctrl_toy", "backdoored_ctrl_toy", "mimic_ctrl_toy",
         "finetune_ctrl_toy"])
    assert "its flags changed (--pretraining_dataset toy_ctrl_t2_p0.1_m100_w32 -> toy_ctrl_t2_p0.2_m100_w32)" in \
        capsys.readouterr().out
    assert poisoned.read_bytes() == before and (data / "toy_ctrl_t2_p0.2_m100_w32" / "train.npz").exists()


def test_badencoder_alone_keeps_todays_folders_and_summary(tmp_path, fake_matrix):
    data = tmp_path / "data"
    toy_data(data)
    run_pipeline.main(matrix_args(data, tmp_path, "--attacks", "badencoder", "--defenses", "mimic", "--no_controls"))
    assert not list(data.glob("toy_ctrl*"))
    assert sorted(Path(flag(a, "--results_dir")).relative_to(tmp_path / "out").as_posix()
                  for _, a in fake_matrix.commands) == [
        "badencoder_toy", "clean", "eval/backdoored_toy", "eval/clean_toy", "eval/mimic_toy", "mimic_toy"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "### toy (target 1)" in text and "by attack and defence" not in text


def test_resuming_the_matrix_after_a_kill_redoes_nothing_finished(tmp_path, fake_matrix, monkeypatch):
    data = tmp_path / "data"
    toy_data(data)
    args = ("--defenses", "mimic,finetune", "--no_controls", "--seeds", "1", "2", "--jobs", "1")

    def killed_at(n):
        def start(cmd, env, log=None):
            if len(fake_matrix.commands) == n:
                raise KeyboardInterrupt          # the runner is killed as it launches the n+1-th stage
            return fake_matrix(cmd, env, log)
        return start

    monkeypatch.setattr(runner, "start_child", killed_at(20))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline.main(matrix_args(data, tmp_path, *args))
    first = [flag(a, "--results_dir") for _, a in fake_matrix.commands]
    assert len(first) == 20

    # A CTRL defence of seed 2 was cut short after writing a checkpoint: it resumes, the rest runs once.
    cut = tmp_path / "out" / "seed_2" / "mimic_ctrl_toy"
    assert str(cut) not in first
    monkeypatch.setattr(runner, "start_child", fake_matrix)
    run_pipeline.main(matrix_args(data, tmp_path, *args))
    second = [flag(a, "--results_dir") for _, a in fake_matrix.commands[20:]]
    assert len(second) == 30 - 20 and not set(first) & set(second)
    save_checkpoint(cut / "checkpoint.pth", {"epoch": 1, "fingerprint": read(cut / "results.json")["fingerprint"]})
    (cut / "results.json").unlink()
    run_pipeline.main(matrix_args(data, tmp_path, *args))
    third = fake_matrix.commands[30:]
    assert [(flag(a, "--results_dir"), "--resume" in a) for _, a in third] == [(str(cut), True)]   # its eval reused

    summary = read(tmp_path / "out" / "summary.json")
    cell = summary["asr_matrix"]["CTRL on toy (target 2)"]["finetune"]
    assert cell["values"] == {"1": 72.0, "2": 74.0} and cell["mean"] == 73.0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "### ASR (%) by attack and defence (mean ± std over 2 seeds)" in text
    assert "| CTRL on toy (target 2) | 8.0 ± 1.4 | 93.0 ± 1.4 | 15.0 ± 1.4 | 73.0 ± 1.4 |" in text


def test_matrix_table_on_hand_made_seeds():
    results = {1: {"t": {"clean": {"asr": 4.0}, "mimic": {"asr": 10.0}}, "CTRL: t": {"mimic": {"asr": 20.0}}},
               2: {"t": {"clean": {"asr": 6.0}, "mimic": {"asr": 14.0}}, "CTRL: t": {"mimic": {"asr": 30.0}}}}
    attacks = {"CTRL: t": {"attack": "ctrl", "task": "t"}}
    matrix = asr_matrix(summarize_seeds(results), attacks)
    assert list(matrix) == ["BadEncoder on t", "CTRL on t"]
    cell = matrix["CTRL on t"]["mimic"]
    assert cell["mean"] == 25.0 and cell["std"] == pytest.approx(50 ** 0.5)
    text = markdown_asr_matrix(matrix)
    assert "| attack | clean | MIMIC |" in text
    assert "| BadEncoder on t | 5.0 ± 1.4 | 12.0 ± 2.8 |" in text and "| CTRL on t |  | 25.0 ± 7.1 |" in text


@pytest.mark.e2e
def test_tiny_matrix_end_to_end_through_the_real_scripts(tmp_path, capsys):
    data = tmp_path / "data"
    toy_data(data)
    run_pipeline.main(matrix_args(
        data, tmp_path, "--defenses", "mimic,finetune", "--no_controls", "--jobs", "2",
        "--clean_args", "--epochs 1 --width 4 --batch_size 16 --knn_freq 0",
        "--badencoder_args", "--epochs 1 --batch_size 16",
        "--mimic_args", "--epochs 1 --mi_epochs 2 --batch_size 16 --ratio 0.5",
        "--defense_args", "--epochs 1 --batch_size 16 --ratio 0.5", "--downstream_args", "--epochs 2"))
    out = tmp_path / "out"
    for suffix in ("toy", "ctrl_toy"):
        for method in ("clean", "backdoored", "mimic", "finetune"):
            results = Results.load(out / "eval" / f"{method}_{suffix}" / "results.json")
            assert 0 <= results.asr <= 100 and 0 <= results.acc <= 100
            assert results.trigger["kind"] == ("ctrl" if suffix == "ctrl_toy" else "patch")
    ckpt = torch.load(out / "ctrl_toy" / Results.load(out / "ctrl_toy" / "results.json").encoder, weights_only=True)
    assert ckpt["normalization"]["dataset"] == "toy"          # the poisoned copy is used as the original
    summary = read(out / "summary.json")
    assert list(summary["asr_matrix"]) == ["BadEncoder on toy (target 1)", "CTRL on toy (target 2)"]
    assert all(list(cells) == ["clean", "backdoored", "mimic", "finetune"] for cells in summary["asr_matrix"].values())
    text = (out / "summary.md").read_text()
    asr = summary["results"][CTRL_TASK]["mimic"]["asr"]
    assert f"| CTRL on toy (target 2) | {summary['results'][CTRL_TASK]['clean']['asr']:.1f} |" in text
    assert f"| MIMIC | {summary['results'][CTRL_TASK]['mimic']['acc']:.2f} | {asr:.2f} |" in text
    figures = out / "figures"
    assert (figures / "attack_matrix.png").is_file() and (figures / "downstream_ctrl_toy.png").is_file()
    assert (figures / "samples.png").is_file() and "not drawn" not in capsys.readouterr().out   # with its CTRL rows
