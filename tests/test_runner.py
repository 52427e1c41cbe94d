"""The one-command runner: its science checks on hand-made numbers, and the paper preset's data check."""
import pytest

import run_pipeline
from utils.errors import UserError


def row(acc, asr):
    return {"acc": acc, "asr": asr, "asr_excluding_target": asr}


def test_demo_checks_on_hand_made_rows():
    rows = {"clean": row(70.0, 12.0), "backdoored": row(66.0, 95.0), "MIMIC": row(61.0, 23.0),
            "no-teacher control": row(61.0, 5.0)}
    checks = dict(run_pipeline.check_demo(rows))
    assert checks == {
        "clean ACC 70.0 >= 60": True,
        "backdoored ASR 95.0 >= 90": True,
        "backdoored ACC 66.0 within 5 of clean 70.0": True,
        "MIMIC ASR 23.0 <= 24.0": True,                 # max(20, 2 x clean ASR 12)
        "MIMIC ACC 61.0 >= clean - 10 = 60.0": True,
        "MIMIC ACC 61.0 > no-teacher ACC 61.0": False,  # a tie is not a win
    }


def test_markdown_table_lists_every_encoder_and_stage():
    table = run_pipeline.markdown({"gtsrb (target 12)": {"clean": row(81.84, 4.92)}}, {"stage 0": 12.34})
    assert "| clean | 81.84 | 4.92 | 4.92 |" in table
    assert "| stage 0 | 12.3 |" in table


def test_paper_preset_names_the_missing_data(tmp_path):
    args = run_pipeline.get_parser().parse_args(
        ["--preset", "paper", "--data_dir", str(tmp_path), "--results_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match=rf"the paper preset needs prepared data; missing: {tmp_path}/cifar10/"
                                        rf"train\.npz, .*gtsrb/train\.npz[^;]*\. "
                                        rf"Create it with: python prepare_data.py --dataset all --download"):
        run_pipeline.main(args)


def test_nproc_shares_the_global_batch_and_launches_training_stages_with_torchrun(tmp_path):
    preset = run_pipeline.PAPER
    assert run_pipeline.batch_args(preset, "clean", 1) == ["--batch_size", "256"]
    assert run_pipeline.batch_args(preset, "clean", 4) == ["--batch_size", "64"]
    assert run_pipeline.batch_args(preset, "mimic", 8) == ["--batch_size", "16"]
    with pytest.raises(UserError, match="the mimic stage's global batch of 128 does not split among "
                                        "--nproc_per_node 3 processes; choose a divisor of 128"):
        run_pipeline.batch_args(preset, "mimic", 3)
    runner = run_pipeline.Runner(tmp_path, [], nproc=4)
    assert runner.launcher(parallel=True)[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=4"]
    assert runner.launcher(parallel=False)[1:] == ["-u"]             # downstream: one process
    assert run_pipeline.Runner(tmp_path, []).launcher(parallel=True)[1:] == ["-u"]


def test_bad_process_count_is_refused_before_any_work(tmp_path):
    for nproc, message in ((0, "--nproc_per_node must be at least 1, got 0"),
                           (3, "the clean stage's global batch of 128 does not split among --nproc_per_node 3")):
        args = run_pipeline.get_parser().parse_args(
            ["--nproc_per_node", str(nproc), "--data_dir", str(tmp_path / "data"), "--results_dir", str(tmp_path / "out")])
        with pytest.raises(UserError, match=message):
            run_pipeline.main(args)
        assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()   # nothing generated
