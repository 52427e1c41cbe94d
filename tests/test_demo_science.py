"""The demo's science over seeds 100, 1 and 2 (slow: python -m pytest -m slow; about 35 minutes on 2 cores
with the runner's default --jobs, from one seed's 1,292 s of stage time): all six of the demo's checks on
every seed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (100, 1, 2)


@pytest.mark.slow
def test_demo_passes_its_checks_on_every_seed(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--results_dir", str(out), "--data_dir",
                           str(tmp_path / "data"), "--seeds", *map(str, SEEDS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in SEEDS:
        summary = json.loads((out / f"seed_{seed}" / "summary.json").read_text())
        assert len(summary["checks"]) == 6 and all(c["passed"] for c in summary["checks"]), (seed, summary["checks"])
    assert json.loads((out / "summary.json").read_text())["seeds"] == list(SEEDS)
