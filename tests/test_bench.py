"""benchmarks/bench.py: every ratio is the median of several repeats, with its range, at the
thread count asked for."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402


def test_spread_is_median_and_range():
    assert bench.spread([1.3, 1.0, 1.1]) == {"median": 1.1, "min": 1.0, "max": 1.3, "values": [1.3, 1.0, 1.1]}
    assert bench.show(bench.spread([1.3, 1.0, 1.1])) == "1.100 (1.000-1.300)"


def test_each_ratio_has_one_value_per_repeat_and_the_downstream_counts_its_evaluation():
    cpu = torch.device("cpu")
    step = bench.bench_mimic_step(cpu, 4, 16, repeats=3, steps=1)["ratio"]
    down = bench.bench_downstream(cpu, epochs=1, repeats=3, n=256)
    pipeline = bench.bench_input_pipeline(cpu, 4, 16, 2, repeats=3)["ratio"]
    for figure in (step, down["ratio"], down["ratio_to_training_only"], pipeline):
        assert len(figure["values"]) == 3 and figure["min"] <= figure["median"] <= figure["max"]
        assert figure["median"] == sorted(figure["values"])[1]
    # the evaluation's forward passes are part of the least work, so the ratio to training alone is larger
    assert down["ratio_to_training_only"]["median"] > down["ratio"]["median"]
    assert down["evaluation_epoch_s"] > 0 and down["real_1000_epochs_s"] == 1000 * down["real_epoch_s"]
