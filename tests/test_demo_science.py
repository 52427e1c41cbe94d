"""The demo's science over seeds 100, 1 and 2, with margins (slow: about 2 hours 20 minutes on 2 CPU cores):
python -m pytest -m slow"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (100, 1, 2)
# Room the demo must leave beyond its own checks on every seed (issue: a demo with margins).
ASR_MARGIN = 5        # backdoored ASR >= 90 + 5
ACC_MARGIN = 2        # MIMIC ACC >= clean ACC - 10 + 2


@pytest.mark.slow
def test_demo_removes_the_backdoor_on_every_seed(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--results_dir", str(out), "--data_dir",
                           str(tmp_path / "data"), "--seeds", *map(str, SEEDS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in SEEDS:
        summary = json.loads((out / f"seed_{seed}" / "summary.json").read_text())
        rows = next(iter(summary["results"].values()))
        clean, bad, mimic = rows["clean"], rows["backdoored"], rows["MIMIC"]
        assert all(c["passed"] for c in summary["checks"]), (seed, summary["checks"])
        assert bad["asr"] >= 90 + ASR_MARGIN, (seed, bad)
        assert mimic["acc"] >= clean["acc"] - 10 + ACC_MARGIN, (seed, mimic, clean)
        assert not summary["mi_not_converged"], (seed, summary["mi"])
    overall = json.loads((out / "summary.json").read_text())
    assert overall["seeds"] == list(SEEDS)
