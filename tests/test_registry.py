"""The registry of attacks and defences (methods/): a method registered by this module alone, with
no other file touched, is planned, run (by the fake stages) and summarised like the built-in ones;
and the folder layout is built in one place."""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import methods
import run_pipeline
from methods import Attack, Defence
from paper import TRIGGER
from pipeline import presets
from pipeline.plan import DOWNSTREAM_SCRIPT, Plan, seed_jobs, stage_scripts
from test_pipeline_runner import FAKE_BACKDOORED, TASK, fake, flag, own_data_args, read  # noqa: F401 (fake: a fixture)
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True, eq=False)
class ToyAttack(Attack):
    """A model-poisoning attack run by a script of its own (the fake stages stand in for it)."""

    def command(self, plan, task, clean_encoder):
        return ["--pretrained_encoder", clean_encoder, "--target", str(task.label)]

    def trigger_flags(self, task):
        return ["--trigger_file", TRIGGER]


@dataclass(frozen=True, kw_only=True, eq=False)
class ToyDefence(Defence):
    def command(self, plan, suspect):
        return ["--suspect", suspect]


TOY_ATTACK = ToyAttack(id="toyattack", label="ToyAttack", kind="model poisoning", stage="toyattack",
                       script="toy_attack.py", presets={"demo": ["--strength", "3"]}, batch={"demo": 32},
                       terms={"toy_term": "toy term (made up)"}, doc="a made-up attack")
TOY_DEFENCE = ToyDefence(id="toydefence", label="Toy defence", stage="toydefence", script="toy_defence.py",
                         presets={"demo": ["--rounds", "2"]}, doc="a made-up defence")


@pytest.fixture
def toys():
    for method in (TOY_ATTACK, TOY_DEFENCE):
        methods.register(method)
    yield
    for method in (TOY_ATTACK, TOY_DEFENCE):
        methods.unregister(method.id)


def test_a_registered_attack_and_defence_are_planned_run_and_summarised(toys, tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, "--attacks", "badencoder,toyattack", "--defenses", "mimic,toydefence",
                         "--no_controls", "--toyattack_args", "--strength 5")
    run_pipeline.main(args)
    by_folder = {Path(flag(a, "--results_dir")).relative_to(tmp_path / "out").as_posix(): (s, a)
                 for s, a in fake.commands}
    script, attack = by_folder["toyattack_gtsrb"]
    # its own flags, its preset's, its batch and its --<stage>_args, in that order
    assert script == "toy_attack.py" and attack[:4] == ["--pretrained_encoder", str(tmp_path / "out/clean/model_1.pth"),
                                                        "--target", "1"]
    assert attack[4:10] == ["--strength", "3", "--batch_size", "32", "--strength", "5"]
    # the registered defence runs against both attacks' encoders, and MIMIC against the toy's
    assert by_folder["toydefence_gtsrb"][1][:2] == ["--suspect", str(tmp_path / "out/badencoder_gtsrb/model_1.pth")]
    assert by_folder["toydefence_toyattack_gtsrb"][1][:2] == [
        "--suspect", str(tmp_path / "out/toyattack_gtsrb/model_1.pth")]
    assert by_folder["mimic_toyattack_gtsrb"][0] == "MIMIC.py"
    assert by_folder["eval/toydefence_toyattack_gtsrb"][0] == "training_downstream_classifier.py"
    summary = read(tmp_path / "out/summary.json")
    assert list(summary["results"]) == [TASK, f"ToyAttack: {TASK}"]
    toy = summary["results"][f"ToyAttack: {TASK}"]
    assert list(toy) == ["clean", "backdoored", "mimic", "toydefence"]
    assert (toy["backdoored"]["acc"], toy["backdoored"]["asr"]) == FAKE_BACKDOORED
    assert list(summary["asr_matrix"]) == [f"BadEncoder on {TASK}", f"ToyAttack on {TASK}"]
    text = (tmp_path / "out/summary.md").read_text()
    assert f"### ToyAttack: {TASK}" in text and "| Toy defence |" in text
    assert re.search(r"\| ToyAttack on gtsrb \(target 1\) \| 5\.0 \| 99\.0 \| 20\.0 \| 20\.0 \|", text)
    # the figures find each attack's evaluations through the layout the runner wrote
    layout = read(tmp_path / "out/layout.json")
    assert layout["eval"]["toyattack_gtsrb"]["toydefence"] == "eval/toydefence_toyattack_gtsrb"
    assert methods.term_labels()["toy_term"] == "toy term (made up)"


def test_a_method_without_flags_for_the_preset_is_refused_before_any_work(toys, tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, "--attacks", "toyattack", "--preset", "paper")
    with pytest.raises(UserError, match=r"^ToyAttack \(toyattack\) has no flags for the paper preset; add an entry "
                                        r"to its presets in test_registry\.py$"):
        run_pipeline.main(args)
    assert fake.commands == []


def test_registering_twice_or_a_wrong_kind_is_refused(toys):
    with pytest.raises(ValueError, match="a method 'toyattack' is registered already"):
        methods.register(TOY_ATTACK)
    with pytest.raises(ValueError, match="kind 'detection' is not one of"):
        methods.register(ToyAttack(id="other", label="x", kind="detection", stage="x", script="x.py"))
    with pytest.raises(ValueError, match="a method 'clean' is registered already"):
        methods.register(ToyDefence(id="clean", label="x", stage="x", script="x.py"))


def test_the_folder_layout_of_both_kinds_of_attack():
    plan = Plan("demo", presets.DEMO, "demo_pretrain", list(presets.DEMO.tasks), ["mimic", "finetune"], True, {}, 1,
                "data", "cpu", "ours", True, attacks=["badencoder", "ctrl"], ratios=[0.01, 0.04])
    task = presets.DEMO.tasks[0]
    assert plan.encoder_folders("badencoder", task, 0.01) == {
        "clean": "clean", "backdoored": "badencoder_demo_downstream", "mimic": "mimic_r0.01_demo_downstream",
        "no_teacher": "no_teacher_r0.01", "uniform": "uniform_r0.01_demo_downstream",
        "finetune": "finetune_r0.01_demo_downstream"}
    assert plan.encoder_folders("ctrl", task, 0.04)["finetune"] == "finetune_ctrl_demo_downstream"
    assert plan.eval_folder("ctrl", task, "backdoored", 0.01) == "eval/backdoored_ctrl_demo_downstream"
    assert plan.eval_folder("badencoder", task, "mimic", 0.01) == "eval/mimic_r0.01_demo_downstream"
    assert plan.layout()["eval"]["demo_downstream"]["mimic_r0.01"] == "eval/mimic_r0.01_demo_downstream"


def test_an_encoder_in_two_attacks_tables_is_evaluated_once_per_trigger(monkeypatch):
    """The clean encoder and the no-teacher control are in BadEncoder's and DRUPE's tables with the
    same trigger: one stage-3 job each, which both tables read. With another trigger, DRUPE's
    table evaluates them again."""
    plan = Plan("demo", presets.DEMO, "demo_pretrain", list(presets.DEMO.tasks), ["mimic"], True,
                {s: [] for s in stage_scripts()}, 1, "data", "cpu", "ours", True,
                clean_encoder="pretrained/demo_clean.pth", attacks=["badencoder", "drupe"])
    task = presets.DEMO.tasks[0]

    def evaluations():
        return [j.key for j in seed_jobs(plan, 1, Path("out")) if j.script == DOWNSTREAM_SCRIPT]
    assert [plan.eval_folder("drupe", task, row) for row in ("clean", "no_teacher", "backdoored", "mimic")] == [
        "eval/clean_demo_downstream", "eval/no_teacher_demo_downstream", "eval/backdoored_drupe_demo_downstream",
        "eval/mimic_drupe_demo_downstream"]
    assert plan.layout()["eval"]["drupe_demo_downstream"]["clean"] == "eval/clean_demo_downstream"
    assert len(evaluations()) == len(set(evaluations())) == 2 * 5 - 2
    monkeypatch.setattr(type(methods.get("drupe")), "trigger_flags", lambda self, task: ["--trigger_file", "other.npz"])
    assert plan.eval_folder("drupe", task, "clean") == "eval/clean_drupe_demo_downstream"
    assert len(evaluations()) == 2 * 5


def test_no_attack_or_defence_is_named_outside_its_module():
    """The runner, the summaries and the figures ask the registry, never `attack == <id>`."""
    ids = "|".join(sorted(methods.attacks()) + sorted(methods.defences()))
    branch = re.compile(rf"""(==|!=|\bin)\s*\(?["'](?:{ids})["']|\b(BADENCODER|CTRL|DEFENSES|ATTACKS)\b(?!')""")
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("pipeline", "report") for path in (ROOT / folder).glob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert found == []


def test_detection_runs_once_per_encoder_and_is_summarised_over_seeds(tiny, tmp_path, fake):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "--defenses", "mimic,finetune",
                                    "--detect", "decree", "--detect_args", "--epochs 3"))
    detect = [(s, a) for s, a in fake.commands if s == "detect.py"]
    # clean, backdoored, MIMIC, FT and the two controls, once each per seed
    folders = sorted(Path(flag(a, "--results_dir")).relative_to(tmp_path / "out/seed_1").as_posix()
                     for _, a in detect if "/seed_1/" in flag(a, "--results_dir"))
    assert folders == [f"detect/decree/{f}" for f in sorted(
        ["clean", "badencoder_gtsrb", "mimic_gtsrb", "uniform_gtsrb", "no_teacher", "finetune_gtsrb"])]
    assert len(detect) == 12
    args = next(a for _, a in detect if "badencoder_gtsrb" in flag(a, "--encoder"))
    assert args[:4] == ["--encoder", str(tmp_path / "out/seed_1/badencoder_gtsrb/model_1.pth"),
                        "--pretraining_dataset", "cifar10"]
    assert flag(args, "--epochs") == "3"                     # --detect_args after the preset's flags
    summary = read(tmp_path / "out/summary.json")
    cells = summary["detection"]["decree"][TASK]
    assert cells["backdoored"]["score"]["mean"] == pytest.approx(0.115) and cells["backdoored"]["flagged"] == 2
    assert cells["clean"]["flagged"] == 0 and cells["mimic"]["score"]["mean"] == pytest.approx(0.6)
    text = (tmp_path / "out/summary.md").read_text()
    assert "### DECREE: is the encoder backdoored? PL1 (mean ± std over seeds) and the seeds flagged" in text
    assert "| backdoored | 0.115 ± 0.0071, 2/2 flagged |" in text and "| clean | 0.6 ± 0, 0/2 flagged |" in text
    seed = read(tmp_path / "out/seed_1/summary.json")["detection"]["decree"][TASK]["backdoored"]
    assert seed == {"score": pytest.approx(0.11), "verdict": "backdoored", "seconds": 1.0}


def test_the_detection_figure_shows_the_real_and_the_recovered_triggers(tiny, tmp_path, fake):
    from report import figures
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls", "--detect", "decree"))
    data = figures.detection_data(tmp_path / "out")
    (detector, table, images), = data
    assert (detector, table) == ("decree", TASK)
    assert [t.split("\n")[0] for t, _ in images] == ["real trigger", "clean", "backdoored", "MIMIC"]
    real = images[0][1]
    assert real.shape == (32, 32, 3) and real[21:31, 21:31].min() == 255 and real[:21].max() == 0
    assert images[2][0] == "backdoored\n0.1, backdoored" and images[2][1][:2, :2].min() == 255
    assert figures.detection_figure(tmp_path / "out", tmp_path / "d.png").stat().st_size > 1000


def test_drupe_is_planned_from_its_module_with_its_three_image_references(tiny, tmp_path, fake):
    from methods.drupe import scaled, shipped_reference
    from paper import TASKS
    assert scaled(120) == ["--epochs", "120", "--warm_up_end", "1", "--stage_1_end", "4", "--fix_end", "20",
                           "--best_after", "24"]                              # its own schedule at 120 epochs
    assert scaled(20)[2:] == ["--warm_up_end", "1", "--stage_1_end", "2", "--fix_end", "3", "--best_after", "4"]
    assert shipped_reference(TASKS["cifar10"][0]) == "reference/drupe/gtsrb_l12_n3.npz"
    assert shipped_reference(presets.DEMO.tasks[0]) == "reference/demo/hexagon_n3.npz"
    run_pipeline.main(own_data_args(tiny, tmp_path, "--attacks", "badencoder,drupe", "--defenses", "mimic",
                                    "--no_controls"))
    attack = next(a for s, a in fake.commands if s == "train_drupe.py")
    made = tmp_path / "ref/cifar10/gtsrb_1_n3.npz"                  # the user's task: its first 3 images
    assert flag(attack, "--reference_file") == str(made) and len(np.load(made)["x"]) == 3
    assert flag(attack, "--pretrained_encoder") == str(tmp_path / "out/clean/model_1.pth")
    summary = read(tmp_path / "out/summary.json")
    assert list(summary["results"]) == [TASK, f"DRUPE: {TASK}"]
