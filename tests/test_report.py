"""Seed statistics checked by hand, figure inputs read back exactly from a fake results folder,
and every figure written as a real PNG."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from report import figures
from report.stats import markdown_mi_table, markdown_seed_table, paired_differences, summarize_seeds
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
TASK = "demo_downstream (target 0)"


def sample_std(values):
    """ddof=1 standard deviation written out, independent of the code under test."""
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def row(acc, asr, excl):
    return {"acc": acc, "asr": asr, "asr_excluding_target": excl}


# Three seeds; the uniform control is missing from seed 3, as after a crashed stage.
PER_SEED = {
    1: {TASK: {"clean": row(80.0, 5.0, 1.0), "backdoored": row(79.0, 99.0, 98.0), "mimic": row(76.0, 10.0, 6.0),
               "no_teacher": row(70.0, 8.0, 5.0), "uniform": row(75.0, 30.0, 25.0)}},
    2: {TASK: {"clean": row(81.0, 6.0, 2.0), "backdoored": row(78.5, 98.0, 97.0), "mimic": row(77.0, 12.0, 7.0),
               "no_teacher": row(71.0, 9.0, 4.0), "uniform": row(74.0, 40.0, 35.0)}},
    3: {TASK: {"clean": row(79.5, 4.0, 1.5), "backdoored": row(80.0, 97.0, 96.0), "mimic": row(78.0, 14.0, 8.0),
               "no_teacher": row(73.0, 10.0, 6.5)}},
}


def test_summarize_seeds_mean_and_sample_std():
    stats = summarize_seeds(PER_SEED)
    acc = stats[TASK]["mimic"]["acc"]
    assert acc["values"] == {1: 76.0, 2: 77.0, 3: 78.0}
    assert acc["mean"] == pytest.approx(77.0)
    assert acc["std"] == pytest.approx(math.sqrt((1 + 0 + 1) / 2))
    excl = stats[TASK]["backdoored"]["asr_excluding_target"]
    assert excl["mean"] == pytest.approx(97.0)
    assert excl["std"] == pytest.approx(sample_std([98.0, 97.0, 96.0]))
    asr = stats[TASK]["mimic"]["asr"]                      # 10, 12, 14: mean 12, std exactly 2
    assert (asr["mean"], asr["std"]) == (pytest.approx(12.0), pytest.approx(2.0))
    partial = stats[TASK]["uniform"]["asr"]   # seeds 1 and 2 only
    assert partial["values"] == {1: 30.0, 2: 40.0}
    assert partial["mean"] == pytest.approx(35.0)
    assert partial["std"] == pytest.approx(math.sqrt(50.0))
    assert list(stats[TASK]) == ["clean", "backdoored", "mimic", "no_teacher", "uniform"]


def test_single_seed_std_is_zero():
    stats = summarize_seeds({7: PER_SEED[1]})
    assert stats[TASK]["clean"]["acc"] == {"values": {7: 80.0}, "mean": 80.0, "std": 0.0}


def test_paired_differences_against_controls_by_default():
    paired = paired_differences(PER_SEED)
    assert set(paired[TASK]) == {"no_teacher", "uniform"}
    no_teacher = paired[TASK]["no_teacher"]["acc"]      # 6, 6, 5
    assert no_teacher["values"] == {1: 6.0, 2: 6.0, 3: 5.0}
    assert no_teacher["mean"] == pytest.approx(17.0 / 3)
    assert no_teacher["std"] == pytest.approx(sample_std([6.0, 6.0, 5.0]))
    uniform = paired[TASK]["uniform"]["asr"]    # -20, -28; seed 3 has no uniform run
    assert uniform["values"] == {1: -20.0, 2: -28.0}
    assert (uniform["mean"], uniform["std"]) == (pytest.approx(-24.0), pytest.approx(math.sqrt(32.0)))
    excl = paired[TASK]["no_teacher"]["asr_excluding_target"]   # 1, 3, 1.5
    assert excl["mean"] == pytest.approx(5.5 / 3)


def test_paired_differences_explicit_against_and_metrics():
    paired = paired_differences(PER_SEED, reference="mimic", metrics=("asr",), against=["backdoored"])
    assert list(paired[TASK]) == ["backdoored"]
    asr = paired[TASK]["backdoored"]
    assert list(asr) == ["asr"]
    assert asr["asr"]["values"] == {1: -89.0, 2: -86.0, 3: -83.0}
    assert (asr["asr"]["mean"], asr["asr"]["std"]) == (pytest.approx(-86.0), pytest.approx(3.0))


def test_markdown_table_shows_mean_std_and_seeds():
    text = markdown_seed_table(summarize_seeds(PER_SEED), paired_differences(PER_SEED))
    assert f"### {TASK}" in text
    assert "| MIMIC | 77.0 ± 1.0 | 1: 76.0, 2: 77.0, 3: 78.0 | 12.0 ± 2.0 | 1: 10.0, 2: 12.0, 3: 14.0 |" in text
    assert "| uniform-weights control | 74.5 ± 0.7 | 1: 75.0, 2: 74.0 | 35.0 ± 7.1 |" in text
    assert "ACC (%) mean ± std" in text
    assert "Paired differences: MIMIC minus other encoder" in text
    assert f"| {TASK}: uniform-weights control | 2.0 ± 1.4 | 1: 1.0, 2: 3.0 | -24.0 ± 5.7 |" in text


# ---------------------------------------------------------------- a fake results folder

MI = {"blocks": ["layer1", "layer2", "layer3", "layer4"], "mi_model": "teacher", "mi": [0.5, 1.25, 2.0, 3.5],
      "weights": [0.1, 0.2, 0.3, 0.4], "history": [[0.1, 0.3, 0.5], [0.2, 1.0, 1.25], [1.0, 2.0, 2.0], [2.0, 3.0, 3.5]],
      "convergence": [{"converged": r == "converged", "reason": r} for r in ("converged", "converged", "rising",
                                                                             "converged")]}
CURVE = [{"epoch": 1, "loss": 2.0, "acc": 40.0, "asr": 90.0, "asr_excluding_target": 85.0, "seconds": 1.0},
         {"epoch": 2, "loss": 1.5, "acc": 55.0, "asr": 20.0, "asr_excluding_target": 12.0, "seconds": 1.0}]


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_log(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def make_run(root, results):
    """A single-seed results folder in the run_pipeline.py layout; MIMIC's eval has only its log
    (still running) and the uniform control has no MI history (uniform weights)."""
    write_log(root / "clean/log.jsonl", [{"epoch": 1, "loss": 5.0, "seconds": 3.0},
                                         {"epoch": 2, "loss": 4.0, "knn_acc": 30.0, "seconds": 3.1},
                                         {"epoch": 3, "loss": 3.5, "knn_acc": 41.2, "seconds": 3.0}],
              tail='{"epoch": 4, "lo')                       # a line cut short by an interrupted run
    write_log(root / "badencoder_demo_downstream/log.jsonl",
              [{"epoch": e, "loss": 1.0 / e, "loss0": -0.5 * e, "loss1": -0.9, "loss2": -0.8, "seconds": 2.0}
               for e in (1, 2)])
    write_log(root / "mimic_demo_downstream/log.jsonl",
              [{"epoch": e, "loss": 6.0 - e, "nce": 5.0 - e, "at": 0.5, "clone": 0.5, "seconds": 2.0} for e in (1, 2)])
    write_json(root / "mimic_demo_downstream/mi.json", MI)
    write_log(root / "uniform_demo_downstream/log.jsonl", [{"epoch": 1, "loss": 5.5, "nce": 5.5, "at": 0.0,
                                                            "clone": 0.0, "seconds": 2.0}])
    write_json(root / "uniform_demo_downstream/mi.json", {**MI, "mi": [0.0] * 4, "weights": [0.25] * 4,
                                                          "history": []})
    for name in ("clean", "backdoored"):
        write_json(root / f"eval/{name}_demo_downstream/results.json",
                   {"acc": 55.0, "asr": 20.0, "asr_excluding_target": 12.0, "target_label": 0,
                    "dataset": "demo_downstream", "curve": CURVE})
    write_log(root / "eval/mimic_demo_downstream/log.jsonl", CURVE[:1])
    write_json(root / "eval/mimic_demo_downstream/args.json", {"dataset": "demo_downstream"})
    write_json(root / "summary.json", {"preset": "demo", "seed": 1, "results": results, "stage_seconds": {},
                                       "total_seconds": 1})
    # which evaluation each figure draws, as the runner writes it (pipeline.plan.Plan.layout); the
    # no-teacher control's has not started
    write_json(root / "layout.json", {"eval": {"demo_downstream": {
        m: f"eval/{m}_demo_downstream" for m in ("clean", "backdoored", "mimic", "no_teacher")}}})
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("demo"), PER_SEED[1])


def is_png(path):
    return Path(path).stat().st_size > 1000 and Path(path).read_bytes()[:8] == PNG


def test_unconverged_blocks_are_named_once_per_seed_table_and_verdict():
    block = {"mi": 1.0, "weight": 2000.0}
    mi = {100: {"gtsrb": {"layer1": {**block, "convergence": "rising"}, "layer2": {**block, "convergence": "rising"},
                          "layer3": {**block, "convergence": "noisy"}, "layer4": {**block, "convergence": "converged"}},
                "DRUPE: gtsrb": {"layer1": {**block, "convergence": "rising"}}}}
    attacks = {"gtsrb": {"attack": "badencoder", "task": "gtsrb"}, "DRUPE: gtsrb": {"attack": "drupe", "task": "gtsrb"}}
    text = markdown_mi_table(mi, attacks)
    assert ("**MI estimate not converged** in 4 block(s): seed 100, BadEncoder: gtsrb: layer1, layer2 (rising); "
            "seed 100, BadEncoder: gtsrb: layer3 (noisy); seed 100, DRUPE: gtsrb: layer1 (rising).") in text
    assert "| 100 | BadEncoder: gtsrb | layer4 | 1 | 2000 | converged |" in text


def test_log_series_keeps_only_epochs_with_a_value(run_dir):
    series = figures.log_series(figures.read_log(run_dir / "clean/log.jsonl"))
    assert series == {"loss": {"epoch": [1, 2, 3], "value": [5.0, 4.0, 3.5]},
                      "knn_acc": {"epoch": [2, 3], "value": [30.0, 41.2]}}
    bad = figures.log_series(figures.read_log(run_dir / "badencoder_demo_downstream/log.jsonl"))
    assert list(bad) == ["loss", "loss0", "loss1", "loss2"]
    assert bad["loss0"] == {"epoch": [1, 2], "value": [-0.5, -1.0]}


def test_mi_extraction(run_dir):
    mi = figures.read_json(run_dir / "mimic_demo_downstream/mi.json")
    data = figures.mi_data(mi)
    assert data["blocks"] == ["layer1", "layer2", "layer3", "layer4"]
    assert data["mi"] == [0.5, 1.25, 2.0, 3.5]
    assert data["weights"] == [0.1, 0.2, 0.3, 0.4]
    assert data["converged"] == [True, True, False, True]
    assert figures.mi_data({k: v for k, v in mi.items() if k != "convergence"})["converged"] is None
    assert figures.mi_history_series(mi)["layer2"] == [0.2, 1.0, 1.25]
    assert figures.mi_history_series(figures.read_json(run_dir / "uniform_demo_downstream/mi.json")) == {}


def test_eval_extraction(run_dir):
    groups = figures.eval_groups(run_dir)
    assert list(groups) == ["demo_downstream"]
    assert groups["demo_downstream"] == {"backdoored": run_dir / "eval/backdoored_demo_downstream",
                                         "clean": run_dir / "eval/clean_demo_downstream",
                                         "mimic": run_dir / "eval/mimic_demo_downstream"}
    finished = figures.log_series(figures.eval_rows(run_dir / "eval/clean_demo_downstream"))
    assert finished["acc"] == {"epoch": [1, 2], "value": [40.0, 55.0]}
    assert finished["asr_excluding_target"]["value"] == [85.0, 12.0]
    running = figures.log_series(figures.eval_rows(run_dir / "eval/mimic_demo_downstream"))
    assert running["asr"] == {"epoch": [1], "value": [90.0]}


def test_bar_data():
    data = figures.bar_data(summarize_seeds(PER_SEED), TASK)
    assert data["encoders"][2] == "MIMIC" and data["seeds"] == 3
    assert data["metrics"] == ["acc", "asr", "asr_excluding_target"]
    assert data["means"]["asr"][2] == pytest.approx(12.0)
    assert data["stds"]["asr"][2] == pytest.approx(2.0)
    assert data["means"]["acc"][4] == pytest.approx(74.5)


def test_grid_images_converted_to_uint8():
    chw = np.zeros((2, 3, 4, 4), dtype=np.float32)
    chw[0, 0] = 1.0
    chw[1, 2] = 0.2
    rows = figures.grid_rows(np.zeros((10, 4, 4, 3), np.uint8), None, None, chw, chw, max_columns=8)
    assert [label for label, _ in rows] == ["clean", "view 1", "view 2"]
    assert rows[0][1].shape == (8, 4, 4, 3)
    view = rows[1][1]
    assert view.dtype == np.uint8 and view.shape == (2, 4, 4, 3)
    assert view[0, :, :, 0].min() == 255 and view[0, :, :, 1].max() == 0
    assert view[1, :, :, 2].max() == 51


def test_grid_ctrl_rows_show_the_trigger_and_its_amplified_difference():
    clean = np.full((3, 4, 4, 3), 100, np.uint8)
    ctrl = clean.copy()
    ctrl[0, 0, 0] = (102, 97, 100)     # +2, -3, 0 grey levels
    rows = figures.grid_rows(clean, None, None, None, None, attack=("CTRL", ctrl))
    assert [label for label, _ in rows] == ["clean", "CTRL trigger", "CTRL - clean, x8"]
    diff = rows[2][1]
    assert diff[0, 0, 0].tolist() == [144, 104, 128]      # 128 + 8 x difference
    assert (diff[1:] == 128).all()
    assert [label for label, _ in figures.grid_rows(clean, clean, None, None, None)] == ["clean", "triggered"]


def test_every_figure_writes_a_png(run_dir, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mi = run_dir / "mimic_demo_downstream/mi.json"
    written = [
        figures.acc_asr_bars(summarize_seeds(PER_SEED), tmp_path / "bars.png"),
        figures.acc_asr_bars(summarize_seeds({1: PER_SEED[1]}), tmp_path / "bars_one_seed.png"),
        figures.training_curves(run_dir / "clean", tmp_path / "clean.png"),
        figures.training_curves(run_dir / "mimic_demo_downstream", tmp_path / "mimic.png"),
        figures.mi_weights(mi, tmp_path / "mi_weights.png"),
        figures.mi_weights(figures.read_json(mi), tmp_path / "mi_weights_dict.png"),
        figures.mi_history(mi, tmp_path / "mi_history.png"),
        figures.downstream_curves(figures.eval_groups(run_dir)["demo_downstream"], tmp_path / "down.png"),
        figures.sample_grid(images, images, images[:2], rng.random((4, 3, 8, 8)), images, tmp_path / "grid.png"),
        figures.sample_grid(images, images, images[:2], None, None, tmp_path / "grid_ctrl.png", attack=("CTRL", images)),
    ]
    assert all(is_png(p) for p in written)


def test_plot_results_single_run(run_dir):
    written = figures.plot_results(run_dir)
    assert sorted(p.name for p in written) == sorted([
        "acc_asr.png", "training_clean.png", "training_badencoder_demo_downstream.png",
        "training_mimic_demo_downstream.png", "training_uniform_demo_downstream.png",
        "mi_weights_mimic_demo_downstream.png", "mi_history_mimic_demo_downstream.png",
        "mi_weights_uniform_demo_downstream.png", "downstream_demo_downstream.png"])
    assert all(p.parent == run_dir / "figures" and is_png(p) for p in written)


def test_plot_results_seeds_and_damaged_files(tmp_path, capsys):
    for seed in (1, 2):
        write_json(tmp_path / f"seed_{seed}/summary.json", {"preset": "demo", "seed": seed, "results": PER_SEED[seed]})
        write_log(tmp_path / f"seed_{seed}/clean/log.jsonl", [{"epoch": 1, "loss": 5.0}])
    (tmp_path / "seed_2/clean/mi.json").write_text('{"mi": [0.1, ')       # cut short
    write_log(tmp_path / "seed_2/mimic_x/log.jsonl", [])                  # stage started, no epoch yet
    (tmp_path / "seed_3").mkdir()                                          # no summary: not a seed run
    written = figures.plot_results(tmp_path)
    assert sorted(p.name for p in written) == ["acc_asr.png", "seed_1_training_clean.png",
                                                "seed_2_training_clean.png"]
    assert (f"warning: skipped seed_2_mi_weights_clean.png: {tmp_path / 'seed_2/clean/mi.json'} is not valid JSON "
            "(damaged or cut short at line 1)\n") in capsys.readouterr().err


def test_a_skipped_figure_says_what_is_wrong_with_which_file_in_plain_words(tmp_path):
    source = tmp_path / "mi.json"
    assert figures.skip_reason(KeyError("curve"), source) == \
        f"{source} has no 'curve' entry (written by another version, or damaged)"
    assert figures.skip_reason(FileNotFoundError(2, "No such file or directory", str(source)), source) == \
        f"cannot read {source} (no such file or directory)"
    assert figures.skip_reason(TypeError("unsupported operand"), {"mimic": source}) == \
        "its source holds a value that cannot be drawn (written by another version, or damaged)"
    assert figures.skip_reason(UserError("x.json is damaged"), source) == "x.json is damaged"


def test_command_on_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "plot_results.py", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"error: no results folder at {missing}\n"


def test_plot_results_draws_the_curves_of_a_folder_written_by_one_stage_script(run_dir, tmp_path):
    """A stage run by its own script (not the runner): its folder holds log.jsonl (and mi.json)."""
    stage = tmp_path / "mimic"
    for name in ("log.jsonl", "mi.json"):
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes((run_dir / "mimic_demo_downstream" / name).read_bytes())
    written = figures.plot_results(stage)
    assert sorted(p.name for p in written) == ["mi_history_mimic.png", "mi_weights_mimic.png", "training_mimic.png"]
    proc = subprocess.run([sys.executable, "plot_results.py", str(stage)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == [str(stage / "figures" / p.name) for p in written]


def test_unconverged_blocks_of_a_real_mimic_run_are_hatched(tiny, tmp_path, monkeypatch):
    """mi.json as MIMIC.py writes it (2 estimator epochs: every block 'too few epochs') reaches the figure."""
    import MIMIC
    from models import SimCLR, encoder_checkpoint
    from utils.files import save_checkpoint
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(teacher, encoder_checkpoint(SimCLR(width=4), usage="cifar10"))
    out = tmp_path / "mimic"
    MIMIC.main(MIMIC.get_parser().parse_args(
        ["--data_dir", str(tiny / "data"), "--teacher", str(teacher), "--results_dir", str(out), "--ratio", "0.5",
         "--batch_size", "16", "--epochs", "1", "--mi_epochs", "2", "--device", "cpu"]))
    assert figures.mi_data(out / "mi.json")["converged"] == [False] * 4
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    figures.mi_weights(out / "mi.json", tmp_path / "mi.png")
    [fig] = drawn
    assert [bar.get_hatch() for bar in fig.axes[0].patches] == ["//"] * 4
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["estimator not converged"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["layer1", "layer2", "layer3", "layer4"]


def test_the_mi_figure_shows_each_blocks_change_over_the_second_half(run_dir, tmp_path, monkeypatch):
    mi = figures.read_json(run_dir / "mimic_demo_downstream/mi.json")
    for report, change in zip(mi["convergence"], (0.02, -0.05, 0.31, 0.0)):
        report["change"] = change
    assert figures.mi_data(mi)["change"] == [0.02, -0.05, 0.31, 0.0]
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    figures.mi_weights(mi, tmp_path / "mi.png")
    assert [t.get_text() for t in drawn[0].axes[0].get_xticklabels()] == [
        "layer1\n+2%", "layer2\n-5%", "layer3\n+31%", "layer4\n+0%"]
