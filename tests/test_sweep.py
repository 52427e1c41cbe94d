"""The clean-data fraction sweep (run_pipeline.py --ratios) and the student's learning-rate schedule
(MIMIC.py --lr_schedule): which jobs a sweep plans and reuses, its tables and figure from hand-made
results, and a schedule that leaves the default run untouched."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import MIMIC
import methods
import run_pipeline
from datasets import save_split
from models.distill import epoch_lr
from pipeline import presets
from pipeline.plan import NotRun, Plan, flag_value, seed_jobs, stage_scripts
from report.figures import ratio_sweep, sweep_lines
from report.stats import markdown_sweep_table, summarize_seeds, sweep_data
from test_pipeline_runner import FAKE_METRICS, TASK, fake, flag, own_data_args, read  # noqa: F401 (fake: a fixture)
from test_robustness import assert_same_weights, encoder, mimic_args, weights  # noqa: F401 (encoder: a fixture)
from utils.errors import UserError

DEMO_TASK = presets.DEMO.tasks[0]


def demo_plan(ratios, methods=("mimic", "finetune", "fine_pruning", "nad"), budget="steps"):
    return Plan("demo", presets.DEMO, "demo_pretrain", [DEMO_TASK], list(methods), True,
                {s: [] for s in stage_scripts()}, 1, "data", "cpu", "ours", True,
                clean_encoder="pretrained/demo_clean.pth", ratios=ratios, sweep_budget=budget, images=6000)


def jobs_by_folder(plan):
    return {job.key: job.args(NotRun()) for job in seed_jobs(plan, 100, Path("out"))}


# ---------------------------------------------------------------- the plan

def test_each_fraction_runs_every_defence_and_control_against_one_backdoored_encoder():
    jobs = jobs_by_folder(demo_plan([0.01, 0.2]))
    assert [k for k in jobs if k.startswith("badencoder")] == ["badencoder_demo_downstream"]
    assert [k for k in jobs if "clean" in k or "backdoored" in k] == ["eval/clean_demo_downstream",
                                                                       "eval/backdoored_demo_downstream"]
    for ratio in ("0.01", "0.2"):
        trained = {f"no_teacher_r{ratio}", *(f"{m}_r{ratio}_demo_downstream" for m in
                                             ("mimic", "uniform", "finetune", "fine_pruning", "nad"))}
        assert trained <= set(jobs)
        for folder in trained:
            assert flag(jobs[folder], "--ratio") == ratio                   # the last --ratio wins
            teacher = flag(jobs[folder], "--suspect" if "--suspect" in jobs[folder] else "--teacher")
            assert teacher == ("pretrained/demo_clean.pth" if folder.startswith("no_teacher")
                               else "<badencoder_demo_downstream>")
            evaluated = f"eval/{folder}" + ("_demo_downstream" if folder.startswith("no_teacher") else "")
            assert flag(jobs[evaluated], "--encoder") == f"<{folder}>"
    assert len(jobs) == 1 + 2 + 2 * (6 + 6)          # BadEncoder, two evaluations, per fraction 6 trained + 6 evaluated


def test_a_swept_student_keeps_the_presets_optimiser_steps_and_a_baseline_its_epochs():
    epochs, batch = int(flag(presets.DEMO.mimic, "--epochs")), presets.DEMO.global_batch["mimic"]
    steps = epochs * (int(presets.DEMO.ratio * 6000) // batch)            # the demo's: 200 x 5 = 1,000
    jobs = jobs_by_folder(demo_plan([0.01, 0.2]))
    for ratio, folder in ((0.2, "mimic_r0.2_demo_downstream"), (0.01, "uniform_r0.01_demo_downstream"),
                          (0.2, "no_teacher_r0.2")):
        per_epoch = int(ratio * 6000) // batch                              # 25 and 1 steps an epoch
        assert int(flag(jobs[folder], "--epochs")) == math.ceil(steps / per_epoch)
    assert (flag(jobs["mimic_r0.2_demo_downstream"], "--epochs"), flag(jobs["mimic_r0.01_demo_downstream"],
                                                                        "--epochs")) == ("40", "1000")
    assert flag(jobs["finetune_r0.2_demo_downstream"], "--epochs") == flag(methods.get("finetune").presets["demo"],
                                                                           "--epochs")
    by_epochs = jobs_by_folder(demo_plan([0.01, 0.2], budget="epochs"))
    assert flag(by_epochs["mimic_r0.2_demo_downstream"], "--epochs") == str(epochs)
    plan = demo_plan([0.2])
    for spelled in (["--epochs", "20"], ["--epochs=20"], ["--epochs", "7", "--epochs=20"]):
        plan.extra["mimic"] = spelled                                     # --mimic_args sets the epochs kept
        assert plan.student_flags(0.2) == ["--ratio", "0.2", "--epochs", str(math.ceil(20 * 5 / 25))]


def test_flag_value_reads_both_spellings_and_the_last_wins():
    assert flag_value(["--lr", "1e-3", "--ratio", "0.2", "--ratio=0.04"], "--ratio") == "0.04"
    assert flag_value(["--ratio=0.1", "--ratio", "0.3"], "--ratio") == "0.3"
    assert flag_value(["--ratios", "0.1", "--ratio_x=2"], "--ratio") is None
    assert flag_value(["--epochs"], "--epochs") is None                    # no value after it: not set


def test_without_ratios_the_folders_and_flags_are_those_of_before_the_sweep():
    jobs = jobs_by_folder(demo_plan(None))
    assert set(jobs) == {"no_teacher", "badencoder_demo_downstream", "eval/clean_demo_downstream",
                         "eval/backdoored_demo_downstream", "eval/no_teacher_demo_downstream",
                         *(f"{m}_demo_downstream" for m in ("mimic", "uniform", "finetune", "fine_pruning", "nad")),
                         *(f"eval/{m}_demo_downstream"
                           for m in ("mimic", "uniform", "finetune", "fine_pruning", "nad"))}
    mimic = jobs["mimic_demo_downstream"]
    assert mimic.count("--ratio") == 1 and flag(mimic, "--ratio") == flag(presets.DEMO.mimic, "--ratio")


def test_the_presets_own_fraction_runs_as_without_ratios_so_a_sweep_reuses_that_run():
    alone = jobs_by_folder(demo_plan(None))
    swept = jobs_by_folder(demo_plan([0.01, presets.DEMO.ratio]))
    assert presets.DEMO.ratio == float(flag(presets.DEMO.mimic, "--ratio"))       # one fact, two spellings
    assert all(swept[folder] == args for folder, args in alone.items())            # same folders, same commands
    assert len(swept) == len(alone) + 12                                           # and 0.01's own jobs


def test_a_sweep_that_sets_ratio_twice_or_holds_less_than_a_batch_is_refused_before_any_work():
    plan = demo_plan([0.04])
    plan.extra["defense"] = ["--epochs", "3", "--ratio=0.1"]
    with pytest.raises(UserError, match=r"^--defense_args sets --ratio, which --ratios sets for every defense job"):
        plan.check_ratios(6000)
    batch = presets.DEMO.global_batch["mimic"]
    small = demo_plan([(batch - 1) / 6000, 0.5])
    with pytest.raises(UserError, match=rf"--ratios {(batch - 1) / 6000:g}: {batch - 1} of the 6000 images of "
                                        rf"demo_pretrain hold less than one mimic batch of {batch}"):
        small.check_ratios(6000)
    demo_plan([0.01, 0.04, 0.2]).check_ratios(6000)             # the documented sweep fits the demo's 6,000 images


# ---------------------------------------------------------------- through the runner

@pytest.fixture
def larger(tiny, tmp_path):
    """The tiny datasets with 400 pre-training images, so that fractions hold a demo batch."""
    root = tmp_path / "larger"
    shutil.copytree(tiny / "data", root / "data")
    rng = np.random.default_rng(1)
    save_split(root / "data" / "cifar10" / "train.npz", rng.integers(0, 200, (400, 32, 32, 3), dtype=np.uint8),
               rng.integers(0, 10, 400))
    return root


def test_the_sweep_reports_a_table_per_fraction_and_reuses_the_fractions_done(larger, tmp_path, fake, capsys):
    batch = max(presets.DEMO.global_batch["mimic"], methods.get("finetune").batch["demo"])
    low, mid, high = (round(k * batch / 400, 4) for k in (1.25, 1.5, 2))
    run_pipeline.main(own_data_args(larger, tmp_path, "--ratios", f"{mid},{high}"))
    first = len(fake.commands)
    assert first == 4 + 2 * 12       # clean, BadEncoder and their evaluations; per fraction 3 students, 3 baselines
    assert [s for s, _ in fake.commands].count("train_badencoder.py") == 1      # and their 6 evaluations
    summary = read(tmp_path / "out" / "summary.json")
    tables = [f"{TASK}, {100 * r:g}% clean data" for r in (mid, high)]
    assert list(summary["results"]) == tables
    assert summary["attacks"][tables[0]] == {"attack": "badencoder", "task": TASK, "ratio": mid}
    assert summary["results"][tables[0]]["backdoored"] == summary["results"][tables[1]]["backdoored"]
    acc, asr = FAKE_METRICS["mimic"]
    assert summary["results"][tables[1]]["mimic"]["acc"] == pytest.approx(acc + 10 * high)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert f"| encoder | {100 * mid:g}% clean data | {100 * high:g}% clean data |" in text
    assert f"| MIMIC | {acc + 10 * mid:.1f} / {asr:.1f} | {acc + 10 * high:.1f} / {asr:.1f} |" in text

    # Another list: only the new fraction's stages run; the shared one and the encoders are reused.
    run_pipeline.main(own_data_args(larger, tmp_path, "--ratios", f"{low},{mid}"))
    new = fake.commands[first:]
    assert len(new) == 12 and all(flag(a, "--results_dir").endswith(f"_r{low:g}") or f"_r{low:g}_" in
                                  flag(a, "--results_dir") for _, a in new)
    assert list(read(tmp_path / "out" / "summary.json")["results"]) == [
        f"{TASK}, {100 * r:g}% clean data" for r in (low, mid)]


# ---------------------------------------------------------------- tables and figure from hand-made results

def hand_made_sweep():
    """Two seeds at fractions 0.01 and 0.2 (given out of order): MIMIC's ASR falls with the fraction."""
    rows = {0.2: {"clean": (80, 5), "backdoored": (79, 99), "mimic": (75, 4), "finetune": (78, 10)},
            0.01: {"clean": (80, 5), "backdoored": (79, 99), "mimic": (40, 30), "finetune": (79, 90)}}
    per_seed = {seed: {f"t, {r}": {m: {"acc": a + seed, "asr": s + 2 * seed} for m, (a, s) in cells.items()}
                       for r, cells in rows.items()} for seed in (1, 3)}
    attacks = {f"t, {r}": {"attack": "badencoder", "task": "t", "ratio": r} for r in rows}
    return summarize_seeds(per_seed), attacks


def test_sweep_table_gives_acc_and_asr_per_fraction_with_the_seed_spread():
    stats, attacks = hand_made_sweep()
    sweep = sweep_data(stats, attacks)
    assert list(sweep) == [("badencoder", "t")] and list(sweep[("badencoder", "t")]["mimic"]) == [0.01, 0.2]
    text = markdown_sweep_table(sweep)
    std = f"{math.sqrt(2):.1f}"                     # ACC 41 and 43: std sqrt(2); ASR 32 and 36: std 2 sqrt(2)
    assert "| encoder | 1% clean data | 20% clean data |" in text
    assert f"| MIMIC | 42.0 ± {std} / 34.0 ± {2 * math.sqrt(2):.1f} | 77.0 ± {std} / 8.0 ± 2.8 |" in text
    assert "| FT | 81.0 ± 1.4 / 94.0 ± 2.8 | 80.0 ± 1.4 / 14.0 ± 2.8 |" in text
    assert markdown_sweep_table(sweep_data(stats, {})) == ""        # no sweep: no table


def test_sweep_figure_draws_each_encoder_against_the_fraction(tmp_path):
    stats, attacks = hand_made_sweep()
    lines = sweep_lines(sweep_data(stats, attacks)[("badencoder", "t")])
    assert lines["ratios"] == [0.01, 0.2] and lines["fixed"] == ["clean", "backdoored"] and lines["seeds"] == 2
    assert lines["lines"]["MIMIC"]["asr"]["means"] == [34.0, 8.0]
    assert lines["lines"]["FT"]["acc"]["stds"] == pytest.approx([math.sqrt(2)] * 2)
    path = ratio_sweep(sweep_data(stats, attacks), tmp_path / "ratio_sweep.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the student's schedule

def test_epoch_lr_is_constant_or_a_half_cosine():
    assert [epoch_lr(0.1, e, 4, "constant") for e in (1, 4)] == [0.1, 0.1]
    assert [epoch_lr(0.1, e, 4, "cosine") for e in (1, 3, 4)] == pytest.approx(
        [0.1, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2])


def test_the_constant_default_never_touches_the_rate_and_cosine_resumes_bit_for_bit(tiny, encoder, tmp_path,
                                                                                     monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(MIMIC, "set_lr", lambda *a: pytest.fail("the constant schedule set the learning rate"))
        MIMIC.main(mimic_args(tiny, encoder, tmp_path / "constant"))
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "cosine", "--lr_schedule", "cosine"))
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "cut", "--lr_schedule", "cosine", "--epochs", "1"))
    MIMIC.main(mimic_args(tiny, encoder, tmp_path / "cut", "--lr_schedule", "cosine", "--resume"))
    assert_same_weights(weights(tmp_path / "cosine/model_2.pth"), weights(tmp_path / "cut/model_2.pth"))
    constant, cosine = weights(tmp_path / "constant/model_2.pth"), weights(tmp_path / "cosine/model_2.pth")
    assert any(not torch.equal(constant[k], cosine[k]) for k in constant)    # epoch 2 ran at half the rate
    state = torch.load(tmp_path / "cosine/model_2.pth", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["lr"] == pytest.approx(epoch_lr(1e-2, 2, 2, "cosine"))
