"""The demo's science (slow: the whole demo, about 35 minutes; fails today, see the README): python -m pytest -m slow"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_removes_the_backdoor(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--results_dir", str(out), "--data_dir",
                           str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = next(iter(summary["results"].values()))
    clean, bad, mimic = rows["clean"], rows["backdoored"], rows["MIMIC"]
    assert clean["acc"] >= 60
    assert bad["asr"] >= 90 and abs(bad["acc"] - clean["acc"]) <= 5
    assert mimic["asr"] <= max(20.0, 2 * clean["asr"])
    assert mimic["acc"] >= clean["acc"] - 10
    assert mimic["acc"] > rows["no-teacher control"]["acc"]
    assert all(c["passed"] for c in summary["checks"])
