"""The runner end to end on the user's own images, every stage a real subprocess: PNG class folders
-> prepare_data.py --image_folder -> run_pipeline.py, once with two stages side by side and once
with one at a time; the numbers must not depend on it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_pipeline
from pipeline import runner
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def test_own_images_end_to_end_and_jobs_do_not_change_the_numbers(tmp_path, monkeypatch, capsys):
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

    def run(jobs, mimic="--epochs 1 --mi_epochs 2 --batch_size 16 --ratio 0.5"):
        out = tmp_path / f"out_{jobs}"
        run_pipeline.main(run_pipeline.get_parser().parse_args(
            ["--pretraining_dataset", "mine", "--task", "mine:1", "--preset", "demo", "--data_dir", str(data),
             "--reference_dir", str(tmp_path / "ref"), "--results_dir", str(out), "--device", "cpu", "--jobs", jobs,
             "--clean_args", "--epochs 1 --width 4 --batch_size 16 --knn_freq 0",
             "--badencoder_args", "--epochs 1 --batch_size 16", "--mimic_args", mimic,
             "--defenses", "mimic", "--no_controls", "--downstream_args", "--epochs 2"]))
        return json.loads((out / "summary.json").read_text())

    summaries = {jobs: run(jobs) for jobs in ("2", "1")}
    summary = summaries["2"]
    rows = summary["results"]["mine (target 1)"]
    assert list(rows) == ["clean", "backdoored", "mimic"]
    assert all(0 <= r[m] <= 100 for r in rows.values() for m in ("acc", "asr", "asr_excluding_target"))
    text = (tmp_path / "out_2" / "summary.md").read_text()
    for method, name in (("clean", "clean"), ("backdoored", "backdoored"), ("mimic", "MIMIC")):
        assert f"| {name} | {rows[method]['acc']:.2f} | {rows[method]['asr']:.2f} |" in text
    mi = summary["mi"]["mine (target 1)"]
    assert list(mi) == ["layer1", "layer2", "layer3", "layer4"]
    assert all(b["convergence"] == "too few epochs" for b in mi.values())   # 2 MI epochs cannot settle
    assert "**MI estimate not converged** in 4 block(s)" in text
    assert (tmp_path / "ref" / "mine" / "mine_1.npz").is_file()
    figures = tmp_path / "out_2" / "figures"
    assert (figures / "samples.png").is_file() and (figures / "acc_asr.png").is_file()
    assert (figures / "mi_weights_mimic_mine.png").is_file()
    assert (tmp_path / "out_2" / "logs" / "mimic_mine.log").is_file()     # side by side: output to a log each

    # --jobs 2 and --jobs 1: the same numbers, bit for bit (only the times differ)
    for key in ("results", "mi", "backdoor_left", "config"):
        assert summaries["2"][key] == summaries["1"][key], key

    # The real stages write the fingerprint the runner computes: a re-run reuses every stage. A
    # re-run whose MIMIC fails fails again when repeated (its folder still holds the old results.json).
    mimic_results = (tmp_path / "out_1" / "mimic_mine" / "results.json").read_text()
    for attempt in range(2):
        with pytest.raises(UserError, match=r"^stage 'stage 2: mimic \(mine\), seed 100' failed"):
            run("1", mimic="--epochs 1 --mi_epochs 2 --batch_size 1 --ratio 0.5")
    assert (tmp_path / "out_1" / "mimic_mine" / "results.json").read_text() == mimic_results
    capsys.readouterr()
    monkeypatch.setattr(runner, "start_child", lambda *a: pytest.fail("a finished stage ran again"))
    assert run("1")["results"] == summaries["1"]["results"]
    assert capsys.readouterr().out.count(", reused") == 6
