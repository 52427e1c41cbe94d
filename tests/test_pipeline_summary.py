"""pipeline/summary.py on hand-made numbers: the demo's checks, which defences left the backdoor,
the per-seed table and the summary over seeds (rows keyed by method id, labels only in markdown)."""
import json

import pytest

from pipeline.summary import backdoor_left, check_demo, seed_markdown, seeds_summary
from utils.records import SeedsSummary, Summary

TASK = "gtsrb (target 12)"


def row(acc, asr):
    return {"acc": acc, "asr": asr, "asr_excluding_target": asr}


def test_demo_checks_on_hand_made_rows():
    rows = {"clean": row(70.0, 12.0), "backdoored": row(66.0, 95.0), "mimic": row(61.0, 23.0),
            "no_teacher": row(61.0, 5.0)}
    assert dict(check_demo(rows)) == {
        "clean ACC 70.0 >= 60": True,
        "backdoored ASR 95.0 >= 90": True,
        "backdoored ACC 66.0 within 5 of clean 70.0": True,
        "MIMIC ASR 23.0 <= 24.0": True,                 # max(20, 2 x clean ASR 12)
        "MIMIC ACC 61.0 >= clean - 10 = 60.0": True,
        "MIMIC ACC 61.0 > no-teacher ACC 61.0": False,  # a tie is not a win
    }


def test_backdoor_left_in_place_is_asr_more_than_10_points_above_clean():
    rows = {"clean": row(80.0, 5.0), "backdoored": row(79.0, 99.0), "mimic": row(75.0, 15.0),
            "finetune": row(78.0, 15.1), "nad": row(77.0, 4.0)}
    assert backdoor_left(rows) == {"mimic": False, "finetune": True, "nad": False}
    assert backdoor_left({"mimic": row(1.0, 2.0)}) == {}


def test_seed_markdown_labels_rows_and_names_the_defences_that_left_the_backdoor():
    rows = {"clean": row(81.84, 4.92), "mimic": row(75.0, 8.0), "finetune": row(76.0, 60.0)}
    summary = Summary(preset="demo", seed=100, results={TASK: rows}, backdoor_left={TASK: backdoor_left(rows)},
                      stage_seconds={"clean": 12.34}, checks=[{"check": "clean ACC 81.8 >= 60", "passed": True}])
    text = seed_markdown(summary)
    assert "| clean | 81.84 | 4.92 | 4.92 |" in text and "| MIMIC | 75.00 | 8.00 | 8.00 |" in text
    assert "| FT | 76.00 | 60.00 | 60.00 |" in text
    assert f"- {TASK}: backdoor left in place (ASR > clean + 10) by FT; removed by MIMIC" in text
    assert "| clean | 12.3 |" in text and "- [x] clean ACC 81.8 >= 60" in text


def test_summary_over_hand_made_seeds():
    rows = {1: {"clean": (80.0, 4.0), "backdoored": (79.0, 98.0), "mimic": (70.0, 10.0),
                "no_teacher": (60.0, 9.0), "finetune": (75.0, 50.0)},
            2: {"clean": (82.0, 6.0), "backdoored": (81.0, 96.0), "mimic": (74.0, 14.0),
                "no_teacher": (61.0, 12.0), "finetune": (71.0, 20.0)}}
    per_seed = {}
    for seed, methods in rows.items():
        mi = {TASK: {"layer1": {"mi": 0.5, "weight": 100.0, "convergence": "converged"},
                     "layer2": {"mi": 0.25, "weight": 50.0, "convergence": "noisy" if seed == 2 else "converged"}}}
        results = {TASK: {m: row(a, r) for m, (a, r) in methods.items()}}
        per_seed[seed] = Summary(preset="paper", seed=seed, results=results, mi=mi, total_seconds=10.0 * seed,
                                 backdoor_left={TASK: backdoor_left(results[TASK])},
                                 checks=[{"check": f"seed {seed} check", "passed": seed == 1}])
    summary, text = seeds_summary(per_seed, wall_seconds=12.5)
    summary = SeedsSummary.from_dict(json.loads(json.dumps(summary.to_dict())))     # as summary.json holds it

    mimic = summary.stats[TASK]["mimic"]
    assert mimic["acc"] == {"values": {"1": 70.0, "2": 74.0}, "mean": 72.0, "std": pytest.approx(2 ** 1.5)}
    assert mimic["asr"]["mean"] == 12.0 and mimic["asr"]["std"] == pytest.approx(2 ** 1.5)
    paired = summary.paired_differences[TASK]
    assert list(paired) == ["no_teacher", "finetune"]                   # not clean, not backdoored
    assert paired["finetune"]["asr"]["values"] == {"1": -40.0, "2": -6.0}      # MIMIC minus FT, same seed
    assert paired["finetune"]["asr"]["mean"] == -23.0
    assert paired["finetune"]["asr"]["std"] == pytest.approx(34 / 2 ** 0.5)
    assert paired["no_teacher"]["acc"]["mean"] == 11.5
    assert summary.checks == {"1": [{"check": "seed 1 check", "passed": True}],
                              "2": [{"check": "seed 2 check", "passed": False}]}
    assert summary.mi_not_converged == [{"seed": 2, "task": TASK, "block": "layer2", "convergence": "noisy"}]
    assert summary.seed_seconds == {"1": 10.0, "2": 20.0} and summary.wall_seconds == 12.5
    assert summary.backdoor_left["1"][TASK] == {"mimic": False, "no_teacher": False, "finetune": True}

    assert "| MIMIC | 72.0 ± 2.8 | 1: 70.0, 2: 74.0 | 12.0 ± 2.8 | 1: 10.0, 2: 14.0 |" in text
    assert f"| {TASK}: FT | -1.0 ± 5.7 | 1: -5.0, 2: 3.0 | -23.0 ± 24.0 | 1: -40.0, 2: -6.0 |" in text
    assert "### Demo checks, seed 1\n\n- [x] seed 1 check" in text and "- [ ] seed 2 check" in text
    assert f"| 2 | {TASK} | layer2 | 0.25 | 50 | noisy |" in text
    assert f"**MI estimate not converged** in 1 block(s): seed 2, {TASK}: layer2 (noisy)" in text


def test_an_attack_that_planted_nothing_is_not_reported_as_removed():
    """CTRL at the demo's scale: backdoored ASR 10.1 against clean 10.0, so no defence 'removed' anything."""
    rows = {"clean": row(79.5, 10.0), "backdoored": row(76.8, 10.1), "mimic": row(73.7, 10.2),
            "finetune": row(79.4, 9.8)}
    summary = Summary(preset="demo", seed=100, results={TASK: rows}, backdoor_left={TASK: backdoor_left(rows)})
    text = seed_markdown(summary)
    assert (f"- {TASK}: no backdoor to remove: the backdoored encoder's ASR 10.1 is within 10 points of the "
            "clean encoder's 10.0") in text
    assert "removed by" not in text
    rows["backdoored"] = row(76.8, 20.1)                      # 10.1 points above clean: a backdoor
    summary = Summary(preset="demo", seed=100, results={TASK: rows}, backdoor_left={TASK: backdoor_left(rows)})
    assert f"- {TASK}: backdoor left in place (ASR > clean + 10) by none; removed by MIMIC, FT" in seed_markdown(summary)
