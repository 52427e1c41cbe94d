"""The demo's shipped clean encoder (pipeline/pretrained.py) and what the runner builds on it: the
checksum checked before use, --train_clean, and the no-teacher control run from the clean encoder
beside stage 1, which is sound only because its teacher never reaches it."""
import json

import pytest
import torch

import run_pipeline
from models import load_encoder
from pipeline import presets, pretrained
from pipeline.plan import Plan, seed_jobs
from methods.mimic import NO_TEACHER
from stage_cli import clean, mimic
from test_pipeline_runner import flag
from utils.errors import UserError
from utils.fingerprint import file_hash


def plan_for(clean_encoder):
    return Plan("demo", presets.DEMO, "demo_pretrain", list(presets.DEMO.tasks), ["mimic", "finetune"], True,
                {s: [] for s in ("clean", "badencoder", "mimic", "defense", "downstream")}, 1, "data", "cpu",
                "ours", True, clean_encoder=clean_encoder)


def test_shipped_encoder_matches_its_record_and_loads():
    path = pretrained.verified()
    record = json.loads(pretrained.record_path(path).read_text())
    assert record["sha256"] == file_hash(path) and record["seed"] == pretrained.SEED
    encoder, ckpt = load_encoder(path)
    assert ckpt["usage"] == "demo_pretrain" and ckpt["arch"]["width"] == 16
    assert "optimizer" not in ckpt
    # the record's command is the demo preset's stage 0, so the two cannot drift apart
    assert record["command"][:-4] == pretrained.rebuild_command("d", "r")[:-4]


def test_a_damaged_or_missing_shipped_encoder_is_one_line_with_the_fix(tmp_path):
    copy = tmp_path / "demo_clean.pth"
    copy.write_bytes(pretrained.DEMO_CLEAN.read_bytes()[:-1] + b"x")
    pretrained.record_path(copy).write_text(pretrained.record_path(pretrained.DEMO_CLEAN).read_text())
    with pytest.raises(UserError, match=r"does not match its checksum .*python -m pipeline.pretrained.*--train_clean"):
        pretrained.verified(copy)
    pretrained.record_path(copy).unlink()
    with pytest.raises(UserError, match=r"demo_clean.json is missing"):
        pretrained.verified(copy)


@pytest.mark.parametrize("record", ['{"sha256": 5}', '[1, 2]', '"abc"', '{"sha256": null}', '{"sha256": "ab12"}'])
def test_a_malformed_record_of_the_shipped_encoder_is_one_line_with_the_fix(tmp_path, record):
    """Issue 37, item 5: {"sha256": 5} was a TypeError traceback in run_pipeline.py."""
    copy = tmp_path / "demo_clean.pth"
    copy.write_bytes(pretrained.DEMO_CLEAN.read_bytes())
    pretrained.record_path(copy).write_text(record)
    with pytest.raises(UserError) as refused:
        pretrained.verified(copy)
    assert str(refused.value) == (f"{tmp_path}/demo_clean.json is unreadable or holds no sha256 (64 hex digits); "
                                  f"rebuild it with `python -m pipeline.pretrained`, or pass --train_clean to train "
                                  f"stage 0 in this run")


def test_shipped_encoder_replaces_stage_0_and_no_teacher_runs_beside_stage_1():
    jobs = {j.key: j for j in seed_jobs(plan_for(str(pretrained.DEMO_CLEAN)), 100, pretrained.ROOT / "out")}
    assert "clean" not in jobs
    assert jobs["badencoder_demo_downstream"].deps == () and jobs[NO_TEACHER].deps == ()
    assert jobs["eval/clean_demo_downstream"].deps == ()
    args = jobs["badencoder_demo_downstream"].args({})
    assert flag(args, "--pretrained_encoder") == str(pretrained.DEMO_CLEAN)
    assert flag(jobs[NO_TEACHER].args({}), "--teacher") == str(pretrained.DEMO_CLEAN)
    assert jobs[f"eval/{NO_TEACHER}_demo_downstream"].deps == (NO_TEACHER,)
    trained = {j.key: j for j in seed_jobs(plan_for(None), 100, pretrained.ROOT / "out")}
    assert trained["badencoder_demo_downstream"].deps == ("clean",) and trained[NO_TEACHER].deps == ("clean",)


def test_train_clean_and_own_data_train_stage_0():
    demo = presets.DEMO
    assert run_pipeline.shipped_clean(demo, "demo_pretrain", False) == str(pretrained.DEMO_CLEAN)
    assert run_pipeline.shipped_clean(demo, "demo_pretrain", True) is None
    assert run_pipeline.shipped_clean(demo, "mine", False) is None          # the encoder is the demo data's
    assert run_pipeline.shipped_clean(presets.PAPER, "cifar10", False) is None


def test_no_teacher_student_does_not_depend_on_its_teacher(tiny, tmp_path):
    """Two different teachers, the no-teacher flags: the same student, bit for bit."""
    import methods
    teachers = []
    for seed in (1, 2):
        assert clean(tiny, tmp_path / f"clean{seed}", "--seed", str(seed), epochs=1) == 0
        teachers.append(tmp_path / f"clean{seed}" / "model_1.pth")
    assert load_encoder(str(teachers[0]))[1]["weights_sha256"] != load_encoder(str(teachers[1]))[1]["weights_sha256"]
    students = []
    for i, teacher in enumerate(teachers):
        assert mimic(tiny, teacher, tmp_path / f"student{i}", *methods.get(NO_TEACHER).student, "--epochs", "2") == 0
        students.append(torch.load(tmp_path / f"student{i}" / "model_2.pth", weights_only=False)["state_dict"])
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_eval_freq_thins_the_curve_but_not_the_numbers(tiny, tmp_path):
    """--eval_freq 3 over 7 epochs: ACC/ASR at epochs 3, 6 and 7 only, the same final numbers and
    the same fingerprint as every epoch."""
    from stage_cli import evaluate
    from utils.records import Results
    assert clean(tiny, tmp_path / "enc", epochs=1) == 0
    found = {}
    for freq in (1, 3):
        assert evaluate(tiny, tmp_path / "enc" / "model_1.pth", tmp_path / f"e{freq}", "--eval_freq", freq,
                        epochs=7) == 0
        found[freq] = Results.load(tmp_path / f"e{freq}" / "results.json")
    assert found[1].metrics() == found[3].metrics() and found[1].fingerprint == found[3].fingerprint
    assert [r["epoch"] for r in found[3].curve if "acc" in r] == [3, 6, 7]
    assert [r["loss"] for r in found[1].curve] == [r["loss"] for r in found[3].curve]


def test_channels_last_stays_off_on_cpu_below_8_channels(capsys, monkeypatch):
    """The demo preset asks for channels-last; a width-4 model (tests, tiny runs) stays contiguous,
    since torch's CPU kernels crashed on it, and says so once per process (MIMIC places a teacher and
    a student); width 8 goes channels-last."""
    from models import SimCLR
    from utils import device
    from utils.device import place
    monkeypatch.setattr(device, "_notes_printed", set())
    narrow = place(SimCLR("resnet18", 4), torch.device("cpu"), channels_last=True)
    assert "channels_last off for this model: a 4-channel convolution" in capsys.readouterr().out
    assert narrow.f.f[0].weight.is_contiguous()
    again = place(SimCLR("resnet18", 4), torch.device("cpu"), channels_last=True)
    assert again.f.f[0].weight.is_contiguous() and capsys.readouterr().out == ""
    wide = place(SimCLR("resnet18", 8), torch.device("cpu"), channels_last=True)
    assert wide.f.f[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert capsys.readouterr().out == ""
