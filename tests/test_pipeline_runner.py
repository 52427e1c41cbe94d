"""The runner (run_pipeline.py and pipeline/) on a stand-in for the stage scripts: which stages run,
with which flags, which are reused, resumed or run again, side by side, and the checks made before
any work. FakeStages writes what each script would."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import methods
import run_pipeline
from datasets import load_reference, load_split, save_split
from datasets.prepare import pick_reference
from paper import TRIGGER
from pipeline import presets, runner
from pipeline.data import select_data
from pipeline.plan import Plan
from pipeline.runner import flag_edits
from utils.errors import UserError
from utils.files import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# ACC and ASR (%) the fake downstream stage reports per encoder folder; seed s adds s % 10 to ACC
# and twice that to ASR. A folder the table does not name gets fake_metrics()'s numbers.
FAKE_METRICS = {"clean": (80.0, 5.0), "badencoder": (78.0, 99.0), "mimic": (75.0, 10.0),
                "no_teacher": (60.0, 8.0), "uniform": (72.0, 30.0), "finetune": (76.0, 60.0),
                "fine_pruning": (74.0, 40.0), "nad": (73.0, 35.0)}
FAKE_BACKDOORED, FAKE_DEFENDED = (78.0, 99.0), (70.0, 20.0)


def fake_metrics(folder):
    """ACC and ASR of an encoder folder (without its task): FAKE_METRICS's, else a backdoored
    encoder's for any registered attack and a defended one's for anything else."""
    if folder in FAKE_METRICS:
        return FAKE_METRICS[folder]
    return FAKE_BACKDOORED if folder in methods.attacks() else FAKE_DEFENDED


FAKE_CONVERGENCE = ["converged", "rising", "converged", "converged"]
TASK = "gtsrb (target 1)"


def flag(args, name):
    """The value after the last occurrence of a flag (later flags win, as in argparse)."""
    return args[len(args) - 1 - args[::-1].index(name) + 1]


class Finished:
    """What start_child returns: a process that has already exited."""

    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


class FakeStages:
    """Stands in for pipeline.runner.start_child: records each stage command and writes what the
    script would: results.json with the stage's fingerprint, naming model_1.pth (and the file, its
    bytes naming the command), mi.json for MIMIC, metrics for stage 3."""

    def __init__(self):
        self.commands = []

    def __call__(self, cmd, env, log=None):
        script = next(c for c in cmd if c.endswith(".py"))
        args = cmd[cmd.index(script) + 1:]
        self.commands.append((script, args))
        out, seed = Path(flag(args, "--results_dir")), int(flag(args, "--seed"))
        out.mkdir(parents=True, exist_ok=True)
        if script == "detect.py":
            # a detector's score: small (backdoored) on an attack's own encoder, large elsewhere
            backdoored = Path(flag(args, "--encoder")).parent.name.split("_")[0] in methods.attacks()
            score = 0.1 + 0.01 * (seed % 10) if backdoored else 0.6
            results = {"stage": "detect", "args": {}, "pl1": score, "seconds": 1.0,
                       "verdict": "backdoored" if backdoored else "clean"}
            mask = np.zeros((4, 4))
            mask[:2, :2] = 1.0
            np.savez(out / "trigger.npz", mask=mask, pattern=np.full((4, 4, 3), 255.0))
        elif script == "training_downstream_classifier.py":
            folder = Path(flag(args, "--encoder")).parent.name.removesuffix("_" + flag(args, "--dataset"))
            swept = re.fullmatch(r"(.+)_r([0-9.e-]+)", folder)      # a fraction of --ratios adds 10 x it to ACC
            acc, asr = fake_metrics(swept[1] if swept else folder)
            acc += 10 * float(swept[2]) if swept else 0
            results = {"stage": "downstream", "args": {}, "acc": acc + seed % 10, "asr": asr + 2 * (seed % 10),
                       "asr_excluding_target": asr}
        else:
            # the weights depend on the flags and on the input encoder's weights, as a real stage's do
            inputs = [Path(flag(args, f)).read_text() for f in ("--pretrained_encoder", "--teacher", "--suspect")
                      if f in args]
            (out / "model_1.pth").write_text(" ".join([a for a in args if a not in ("--resume", "--overwrite")] + inputs))
            results = {"stage": script, "args": {}, "encoder": "model_1.pth"}
        if script == "MIMIC.py":
            (out / "mi.json").write_text(json.dumps({
                "blocks": ["layer1", "layer2", "layer3", "layer4"], "mi": [0.5, 0.25, 1.0, 2.0],
                "weights": [1.0, 2.0, 3.0, 4.0],
                "convergence": [{"converged": r == "converged", "reason": r} for r in FAKE_CONVERGENCE]}))
        results["fingerprint"] = runner.fingerprint_of([script, *args])
        (out / "results.json").write_text(json.dumps(results))
        return Finished(0)

    def scripts(self):
        return [script for script, _ in self.commands]


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(runner, "start_child", stages)
    monkeypatch.setattr(run_pipeline, "draw_figures", lambda *a: [])
    return stages


def own_data_args(data_root, tmp_path, *extra, pretraining="cifar10", task="gtsrb:1"):
    """Runner flags for datasets under data_root/data as the user's own (the tiny fixture's gtsrb has labels 0..4)."""
    return run_pipeline.get_parser().parse_args(
        ["--pretraining_dataset", pretraining, "--task", task, "--data_dir", str(data_root / "data"),
         "--reference_dir", str(tmp_path / "ref"), "--results_dir", str(tmp_path / "out"), "--device", "cpu",
         *extra])


def read(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- what runs, and what is reused

def test_a_changed_flag_is_named_with_its_old_and_new_value():
    before = ["train_drupe.py", "--epochs", "20", "--fix_end", "3", "--lr", "0.02", "--amp", "on"]
    now = ["train_drupe.py", "--epochs", "40", "--fix_end", "6", "--lr", "0.02", "--debug"]
    assert flag_edits(before, now) == ["--epochs 20 -> 40", "--fix_end 3 -> 6", "before: --amp on; now: --debug"]
    assert flag_edits(before, before) == []


def test_seeds_run_once_and_a_rerun_reuses_every_finished_stage(tiny, tmp_path, fake, capsys):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "--no_controls"))
    out = tmp_path / "out"
    per_seed = len(fake.commands) // 2
    assert per_seed == 12          # clean, BadEncoder, MIMIC, FT, FP, NAD + 6 evaluations
    assert not (out / "clean").exists() and (out / "seed_2" / "clean" / "model_1.pth").exists()
    summary = read(out / "summary.json")
    assert summary["seeds"] == [1, 2]
    mimic_acc = summary["stats"][TASK]["mimic"]["acc"]
    assert mimic_acc["values"] == {"1": 76.0, "2": 77.0} and mimic_acc["mean"] == 76.5
    assert summary["paired_differences"][TASK]["finetune"]["acc"]["mean"] == -1.0
    assert summary["mi"]["1"][TASK]["layer2"] == {"mi": 0.25, "weight": 2.0, "convergence": "rising"}
    assert len(summary["mi_not_converged"]) == 2          # layer2 of each seed
    assert summary["backdoor_left"]["1"][TASK] == {"mimic": False, "finetune": True, "fine_pruning": True,
                                                   "nad": True}

    capsys.readouterr()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "--no_controls"))
    assert len(fake.commands) == 2 * per_seed
    assert "stage 0: clean encoder, seed 1: done earlier" in capsys.readouterr().out

    # A third seed runs only its own stages; an evaluation folder removed from seed 2 runs again.
    (out / "seed_2" / "eval" / "nad_gtsrb" / "results.json").unlink()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--seeds", "1", "2", "3", "--no_controls"))
    new = [(flag(args, "--seed"), Path(flag(args, "--results_dir"))) for _, args in fake.commands[2 * per_seed:]]
    assert ("2", out / "seed_2" / "eval" / "nad_gtsrb") in new
    assert len(new) == 1 + per_seed
    assert sum(seed == "3" and folder.is_relative_to(out / "seed_3") for seed, folder in new) == per_seed
    assert read(out / "summary.json")["seeds"] == [1, 2, 3]


def test_changed_flags_or_inputs_run_the_stage_and_everything_after_it_again(tiny, tmp_path, fake, capsys):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls"))
    assert len(fake.commands) == 6                      # clean, BadEncoder, MIMIC, 3 evaluations
    out = tmp_path / "out"

    # Other downstream flags: every evaluation runs again (from scratch), nothing else.
    capsys.readouterr()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls",
                                    "--downstream_args", "--nn_epochs 3"))
    again = fake.commands[6:]
    assert [s for s, _ in again] == ["training_downstream_classifier.py"] * 3
    assert all("--overwrite" in a and flag(a, "--nn_epochs") == "3" for _, a in again)
    assert "its flags changed (before: -; now: --nn_epochs 3); running it again" in capsys.readouterr().out

    # The clean encoder's file changed in place: BadEncoder, MIMIC and every evaluation run again.
    (out / "clean" / "model_1.pth").write_text("other weights")
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls",
                                    "--downstream_args", "--nn_epochs 3"))
    assert sorted(s for s, _ in fake.commands[9:]) == ["MIMIC.py", "train_badencoder.py"] + \
        ["training_downstream_classifier.py"] * 3      # the clean encoder's own evaluation too
    assert re.search(r"== stage 1: BadEncoder \(gtsrb\), seed 100: its inputs changed \(input pretrained_encoder "
                     r"changed \(sha256 \w{4}\.\. -> \w{4}\.\.\)\); running it again", capsys.readouterr().out)


def test_a_stage_with_a_checkpoint_of_the_same_command_is_resumed(tiny, tmp_path, fake):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls"))
    mimic = tmp_path / "out" / "mimic_gtsrb"
    # killed during its run: checkpoint.pth carries the run's fingerprint, results.json is not yet written
    save_checkpoint(mimic / "checkpoint.pth", {"epoch": 1, "fingerprint": read(mimic / "results.json")["fingerprint"]})
    (mimic / "results.json").unlink()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls"))
    script, args = fake.commands[6]
    assert script == "MIMIC.py" and "--resume" in args and "--overwrite" not in args
    assert len(fake.commands) == 7                      # MIMIC wrote the same weights: its evaluation is reused

    # a checkpoint.pth of another run (other flags) is not resumed, even with runner.json naming this command
    save_checkpoint(mimic / "checkpoint.pth", {"epoch": 1, "fingerprint": {"flags": {"lr": 5.0}, "inputs": {}}})
    (mimic / "results.json").unlink()
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls"))
    script, args = fake.commands[7]
    assert script == "MIMIC.py" and "--overwrite" in args and "--resume" not in args


class Killed:
    """A stage process during which the runner is stopped (SIGTERM, Ctrl-C) before it wrote anything."""

    def poll(self):
        raise KeyboardInterrupt

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return -15


def test_a_failed_or_killed_rerun_never_reuses_the_old_results(tiny, tmp_path, monkeypatch, capsys):
    """Issue 37, item 1: a re-run with other flags that fails (or is killed) before the stage clears
    its folder leaves the old results.json there; running that command again must run the stage."""
    fake = FakeStages()
    stopped = {"MIMIC.py"}

    def stage(cmd, env, log=None):
        script = next(c for c in cmd if c.endswith(".py"))
        if script == "MIMIC.py" and flag(cmd, "--batch_size") == "1":
            return Finished(2)             # MIMIC.py refuses --batch_size 1 before it touches its folder
        if script in stopped:
            stopped.clear()
            return Killed()
        return fake(cmd, env, log)

    monkeypatch.setattr(runner, "start_child", stage)
    monkeypatch.setattr(run_pipeline, "draw_figures", lambda *a: [])
    base = ("--defenses", "mimic", "--no_controls", "--jobs", "1")
    stopped.clear()
    run_pipeline.main(own_data_args(tiny, tmp_path, *base))
    results = tmp_path / "out" / "mimic_gtsrb" / "results.json"
    first = read(results)
    for attempt in range(2):               # the second attempt is the one that used to exit 0
        with pytest.raises(UserError, match=r"^stage 'stage 2: mimic \(gtsrb\), seed 100' failed"):
            run_pipeline.main(own_data_args(tiny, tmp_path, *base, "--mimic_args", "--batch_size 1"))
        assert "== stage 2: mimic (gtsrb), seed 100: its flags changed (before: -; now: --batch_size 1); " \
               "running it again" in capsys.readouterr().out
    assert read(results) == first
    assert read(tmp_path / "out" / "summary.json")["config"]["extra"]["mimic"] == []

    # Stopped while MIMIC runs with --lr 0.05, then the same command again: MIMIC runs, from scratch.
    stopped.add("MIMIC.py")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline.main(own_data_args(tiny, tmp_path, *base, "--mimic_args", "--lr 0.05"))
    before = len(fake.commands)
    run_pipeline.main(own_data_args(tiny, tmp_path, *base, "--mimic_args", "--lr 0.05"))
    script, args = fake.commands[before]
    assert script == "MIMIC.py" and flag(args, "--lr") == "0.05" and "--overwrite" in args
    assert read(results)["fingerprint"]["flags"]["lr"] == 0.05
    assert read(tmp_path / "out" / "summary.json")["config"]["extra"]["mimic"] == ["--lr", "0.05"]

    # The original command once more: the folder holds the --lr 0.05 run, so MIMIC runs again too.
    capsys.readouterr()
    run_pipeline.main(own_data_args(tiny, tmp_path, *base))
    assert "its flags changed (before: --lr 0.05; now: -); running it again" in capsys.readouterr().out
    assert read(results)["fingerprint"] == first["fingerprint"]


def test_a_moved_results_folder_is_reused_when_its_inputs_have_the_same_content(tiny, tmp_path, fake, capsys):
    base = ("--defenses", "mimic", "--no_controls")
    run_pipeline.main(own_data_args(tiny, tmp_path, *base))
    count = len(fake.commands)
    shutil.move(tmp_path / "out", tmp_path / "moved")
    capsys.readouterr()
    run_pipeline.main(own_data_args(tiny, tmp_path, *base, "--results_dir", str(tmp_path / "moved")))
    assert len(fake.commands) == count                  # nothing ran again
    printed = capsys.readouterr().out
    assert (f"== stage 2: mimic (gtsrb), seed 100: done earlier ({tmp_path}/moved/mimic_gtsrb/results.json), "
            f"reused; its inputs have the same content at new paths (--teacher {tmp_path}/out/badencoder_gtsrb/"
            f"model_1.pth -> {tmp_path}/moved/badencoder_gtsrb/model_1.pth)") in printed

    # Moved again, an input's content changed too: the stage runs again, and the line says both
    # (runner.json still names the paths of the run that finished).
    (tmp_path / "moved" / "badencoder_gtsrb" / "model_1.pth").write_text("other weights")
    shutil.move(tmp_path / "moved", tmp_path / "again")
    run_pipeline.main(own_data_args(tiny, tmp_path, *base, "--results_dir", str(tmp_path / "again")))
    assert re.search(r"== stage 2: mimic \(gtsrb\), seed 100: its inputs changed \(input teacher changed \(sha256 "
                     r"\w{4}\.\. -> \w{4}\.\.\)\); an input's path changed \(--teacher .*/out/badencoder_gtsrb/"
                     r"model_1\.pth -> .*/again/badencoder_gtsrb/model_1\.pth\); running it again",
                     capsys.readouterr().out)


def test_defences_get_a_row_each_beside_mimic(tiny, tmp_path, monkeypatch, capsys):
    fake = FakeStages()                                  # and real figures: a plotting failure must only warn
    monkeypatch.setattr(runner, "start_child", fake)

    def broken(results_dir):
        raise RuntimeError("no display")
    monkeypatch.setattr("pipeline.samples.plot_results", broken)
    run_pipeline.main(own_data_args(tiny, tmp_path, "--preset", "demo"))
    out = tmp_path / "out"

    summary = read(out / "summary.json")                # one seed: its folder is the results folder
    rows = summary["results"][TASK]
    assert list(rows) == ["clean", "backdoored", "mimic", "no_teacher", "uniform", "finetune", "fine_pruning", "nad"]
    assert rows["fine_pruning"] == {"acc": 74.0, "asr": 40.0, "asr_excluding_target": 40.0}
    assert "checks" not in summary                      # the demo's checks are for the demo's data
    text = (out / "summary.md").read_text()
    assert "| FT | 76.00 | 60.00 | 60.00 |" in text and "| NAD | 73.00 | 35.00 | 35.00 |" in text
    assert "| uniform-weights control | 72.00 | 30.00 | 30.00 |" in text
    assert "| 100 | gtsrb (target 1) | layer2 | 0.25 | 2 | rising |" in text
    assert "**MI estimate not converged** in 1 block(s): seed 100, gtsrb (target 1): layer2 (rising)" in text

    suspect = str(out / "badencoder_gtsrb" / "model_1.pth")
    defences = {flag(a, "--defense"): a for s, a in fake.commands if s == "defenses.py"}
    mimic_args = next(a for s, a in fake.commands if s == "MIMIC.py")
    assert list(defences) == ["finetune", "fine_pruning", "nad"]
    for name, args in defences.items():
        assert flag(args, "--suspect") == suspect and flag(args, "--pretraining_dataset") == "cifar10"
        # the demo preset's baseline budget, on MIMIC's clean subset
        assert [flag(args, f) for f in ("--epochs", "--ratio", "--lr", "--batch_size")] == \
            ["10", "0.04", "1e-3", "48"]
        assert flag(args, "--ratio") == flag(mimic_args, "--ratio")
        assert flag(args, "--results_dir") == str(out / f"{name}_gtsrb")
        assert ("--nad_teacher_epochs" in args) == (name == "nad")
    evaluated = [Path(flag(a, "--results_dir")).name for s, a in fake.commands if s == "training_downstream_classifier.py"]
    assert evaluated[-3:] == ["finetune_gtsrb", "fine_pruning_gtsrb", "nad_gtsrb"]
    assert not any("--encoder_usage_info" in args for _, args in fake.commands)

    # The reference file made for the task is the medoid of label 1's train images, as prepare_data.py picks it.
    x, y = load_split(tiny / "data", "gtsrb", "train")
    ref_x, ref_label = load_reference(tmp_path / "ref" / "cifar10" / "gtsrb_1.npz")
    images = x[np.flatnonzero(y == 1)]
    assert ref_label == 1 and np.array_equal(ref_x, images[pick_reference(images, 1)])

    printed = capsys.readouterr().out
    assert "warning: figures not drawn (RuntimeError: no display)" in printed
    assert (out / "figures" / "samples.png").is_file()                  # the sample grid still drawn


def test_protocol_reaches_every_stage(tiny, tmp_path, fake):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--protocol", "authors", "--no_controls"))
    assert len(fake.commands) == 12 and all(flag(a, "--protocol") == "authors" for _, a in fake.commands)
    assert read(tmp_path / "out" / "summary.json")["config"]["protocol"] == "authors"


def test_defences_flag_chooses_what_runs(tiny, tmp_path, fake):
    run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "nad", "--no_controls"))
    assert "MIMIC.py" not in fake.scripts()
    summary = read(tmp_path / "out" / "summary.json")
    assert list(summary["results"][TASK]) == ["clean", "backdoored", "nad"]
    assert summary["mi"] == {}
    with pytest.raises(SystemExit):
        run_pipeline.get_parser().parse_args(["--defenses", "mimic,pruning"])


def test_side_by_side_jobs_respect_dependencies_and_the_limit(tiny, tmp_path, monkeypatch):
    """Stages that take time: at most --jobs at once, none before the stages it reads, threads fixed."""
    events, live, logs = [], {}, []

    class Slow:
        def __init__(self, cmd, env, log):
            self.folder = Path(flag(cmd, "--results_dir"))
            self.left, self.cmd = 3, cmd
            logs.append(log)
            events.append(("start", self.folder.name, env["OMP_NUM_THREADS"], len(live) + 1))
            live[self.folder] = self

        def poll(self):
            self.left -= 1
            if self.left:
                return None
            del live[self.folder]
            events.append(("end", self.folder.name))
            return FakeStages()(self.cmd, None).poll()

    monkeypatch.setattr(runner, "start_child", Slow)
    monkeypatch.setattr(runner, "POLL_SECONDS", 0)
    monkeypatch.setattr(run_pipeline, "draw_figures", lambda *a: [])
    run_pipeline.main(own_data_args(tiny, tmp_path, "--no_controls", "--jobs", "2", "--threads", "1"))
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 12 and max(e[3] for e in starts) == 2 and {e[2] for e in starts} == {"1"}
    order = [e[1] for e in events]
    assert order.index("clean") < order.index("badencoder_gtsrb")
    for name in ("mimic_gtsrb", "finetune_gtsrb", "fine_pruning_gtsrb", "nad_gtsrb"):
        assert events.index(("end", "badencoder_gtsrb")) < order.index(name)
    assert {Path(log).parent for log in logs} == {tmp_path / "out" / "logs"} and len(set(logs)) == 12


def test_a_failed_stage_stops_the_run_with_one_line(tiny, tmp_path, monkeypatch):
    fake = FakeStages()

    def failing(cmd, env, log=None):
        return Finished(1) if "MIMIC.py" in cmd else fake(cmd, env, log)

    monkeypatch.setattr(runner, "start_child", failing)
    with pytest.raises(UserError, match=r"^stage 'stage 2: mimic \(gtsrb\), seed 100' failed \(command above\); "
                                        r"not run because of it: eval/mimic_gtsrb; fix it and run again to continue$"):
        run_pipeline.main(own_data_args(tiny, tmp_path, "--no_controls", "--jobs", "1"))
    assert fake.scripts().count("training_downstream_classifier.py") == 5     # the independent stages still ran


def test_a_failed_stage_0_is_named_with_its_error_line_its_log_and_what_waited_on_it(tiny, tmp_path, monkeypatch):
    """Issue 37, item 7: with --jobs 2 the error is only in the log; the stages after stage 0 wait on it."""
    def failing(cmd, env, log=None):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text("epoch 1/2\nerror: loss became nan at epoch 1, step 3; stopped\n")
        return Finished(2)

    monkeypatch.setattr(runner, "start_child", failing)
    log = tmp_path / "out" / "logs" / "clean.log"
    with pytest.raises(UserError) as refused:
        run_pipeline.main(own_data_args(tiny, tmp_path, "--defenses", "mimic", "--no_controls", "--jobs", "2"))
    assert str(refused.value) == (
        f"stage 'stage 0: clean encoder, seed 100' failed (error: loss became nan at epoch 1, step 3; stopped); "
        f"its output is in {log}; not run because of it: badencoder_gtsrb, mimic_gtsrb, eval/clean_gtsrb, "
        f"eval/backdoored_gtsrb, eval/mimic_gtsrb; fix it and run again to continue")


def test_a_second_runner_on_the_same_folder_is_refused_before_it_writes(tiny, tmp_path, fake):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from utils.lock import RunLock; RunLock(sys.argv[2]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"^{out} is being written by process {holder.pid}"):
            run_pipeline.main(own_data_args(tiny, tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert fake.commands == [] and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_interrupted_runner_stops_its_stage(tmp_path):
    pid_file = tmp_path / "pid"
    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    job = runner.Job("sleep", "sleeper", str(script), tmp_path / "stage", lambda done: [str(pid_file)])

    def interrupt(signum, frame):
        if not pid_file.exists() or not pid_file.read_text():
            signal.setitimer(signal.ITIMER_REAL, 0.1)          # the child has not started yet
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            runner.Runner(tmp_path, []).run([job])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for _ in range(100):                                        # stopped: gone within the 30 s of stop()
        try:
            os.kill(int(pid_file.read_text()), 0)
        except ProcessLookupError:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the stage process is still running")


# ---------------------------------------------------------------- checks before any work

def test_global_batch_must_split_among_processes(tmp_path):
    plan = Plan("paper", presets.PAPER, "cifar10", [], [], False, {}, 4, "data", "cpu", "ours", False)
    assert plan.batch("clean") == ["--batch_size", "64"] and plan.batch("mimic") == ["--batch_size", "32"]
    plan.nproc = 3
    with pytest.raises(UserError, match="the mimic stage's global batch of 128 does not split among "
                                        "--nproc_per_node 3 processes; choose a divisor of 128"):
        plan.batch("mimic")
    args = run_pipeline.get_parser().parse_args(
        ["--nproc_per_node", "3", "--data_dir", str(tmp_path / "data"), "--results_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match="the clean stage's global batch of 128 does not split among --nproc_per_node 3"):
        run_pipeline.main(args)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()   # nothing generated


def test_task_with_an_absent_label_is_refused_before_any_work(tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, task="gtsrb:7")
    with pytest.raises(UserError, match=rf"^label 7 does not occur in {tiny}/data/gtsrb/test\.npz \(its labels "
                                        r"run from 0 to 4\)$"):
        run_pipeline.main(args)
    assert fake.commands == [] and not (tmp_path / "ref").exists()


def test_task_label_against_its_reference_file_is_refused_before_any_work(tiny, tmp_path, fake):
    """Issue 37, item 8: stage 3 refused it, after stages 0-2 had trained."""
    args = own_data_args(tiny, tmp_path, task=f"gtsrb:2:{tiny / 'priority.npz'}")
    with pytest.raises(UserError) as refused:
        run_pipeline.main(args)
    assert str(refused.value) == (
        f"the label 2 of task gtsrb differs from the label 1 of the reference file {tiny / 'priority.npz'}; the "
        f"reference inputs must be of the target class (pass the reference file of that class, or leave REFERENCE "
        f"out of --task to have one made)")
    assert fake.commands == []


def test_missing_data_and_a_trigger_of_another_size_are_named(tiny, tmp_path, fake):
    args = own_data_args(tiny, tmp_path, task="mine:1")
    with pytest.raises(UserError, match=rf"^this run needs prepared data; missing: {tiny}/data/mine/train\.npz, "
                                        rf"{tiny}/data/mine/test\.npz\. Create it with: python prepare_data\.py "
                                        rf"--image_folder DIR --name mine --out {tiny}/data$"):
        run_pipeline.main(args)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        save_split(tmp_path / "data" / "small" / f"{split}.npz", rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                   np.arange(8) % 2)
    args = own_data_args(tmp_path, tmp_path, pretraining="small", task="small:1")
    with pytest.raises(UserError, match=rf"^the trigger {TRIGGER} is 32x32 pixels but the images of "
                                        rf"{tmp_path}/data/small/train\.npz are 16x16"):
        run_pipeline.main(args)
    assert fake.commands == []


def test_paper_preset_names_the_missing_data_and_runs_a_subset_of_its_tasks(tmp_path):
    parser = run_pipeline.get_parser()
    args = parser.parse_args(["--preset", "paper", "--data_dir", str(tmp_path), "--results_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match=rf"the paper preset needs prepared data; missing: {tmp_path}/cifar10/"
                                        rf"train\.npz, .*gtsrb/train\.npz[^;]*\. "
                                        rf"Create it with: python prepare_data.py --dataset all --download"):
        run_pipeline.main(args)
    args = parser.parse_args(["--preset", "paper", "--tasks", "svhn", "--data_dir", str(tmp_path),
                              "--results_dir", str(tmp_path / "out")])
    pretraining, tasks = select_data(presets.PAPER, "paper", subset=args.tasks)
    assert pretraining == "cifar10" and [(t.dataset, t.label, t.reference) for t in tasks] == [
        ("svhn", 1, "reference/cifar10/one.npz")]
    with pytest.raises(UserError) as refused:
        run_pipeline.main(args)
    message = str(refused.value)
    assert "svhn/train.npz" in message and "cifar10/train.npz" in message
    assert "reference/" not in message                 # the released reference files are shipped
    assert "gtsrb" not in message and "stl10" not in message
    assert f"python prepare_data.py --dataset cifar10 svhn --download --out {tmp_path}" in message
    args.tasks = ["gtsrb", "mnist"]
    with pytest.raises(UserError, match=r"^--tasks: the paper preset has no task mnist \(its tasks: gtsrb, svhn, stl10\)$"):
        run_pipeline.main(args)


@pytest.mark.parametrize("case, message", [
    ("quote", r"^--mimic_args '--epochs \"5': No closing quotation \(quote the flags as in a shell\)$"),
    ("truncated", r"^cannot read the labels of .*/gtsrb/test\.npz: "),
    ("flat", r"^.*/gtsrb/test\.npz: x has shape \(30, 3072\); expected \(N, H, W, 3\) images"),
    ("empty", r"^.*/gtsrb/test\.npz holds no images; a split needs at least one$"),
])
def test_hostile_runner_inputs_are_one_line_before_any_work(tiny, tmp_path, fake, case, message):
    data = tmp_path / "copy"
    shutil.copytree(tiny / "data", data / "data")
    test = data / "data" / "gtsrb" / "test.npz"
    if case == "truncated":
        test.write_bytes(test.read_bytes()[:200])
    elif case == "flat":
        np.savez(test, x=np.zeros((30, 3072), np.uint8), y=np.arange(30) % 5)
    elif case == "empty":
        np.savez(test, x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    extra = ["--mimic_args", '--epochs "5'] if case == "quote" else []
    with pytest.raises(UserError, match=message):
        run_pipeline.main(own_data_args(data, tmp_path, *extra))
    assert fake.commands == []


def test_a_bad_flag_names_its_stage_args_before_any_stage_runs(tiny, tmp_path, fake):
    with pytest.raises(UserError, match=r"^stage 2: mimic \(gtsrb\), seed 100 \(MIMIC.py\): unrecognized arguments: "
                                        r"--fooo 1; check --mimic_args '--fooo 1'$"):
        run_pipeline.main(own_data_args(tiny, tmp_path, "--no_controls", "--mimic_args", "--fooo 1"))
    with pytest.raises(UserError, match=r"^stage 3: clean on gtsrb, seed 100 \(training_downstream_classifier.py\): "
                                        r"argument --nn_epochs/--epochs: must be a positive integer, got -2; "
                                        r"check --downstream_args '--nn_epochs -2'$"):
        run_pipeline.main(own_data_args(tiny, tmp_path, "--no_controls", "--downstream_args", "--nn_epochs -2"))
    assert fake.commands == [] and not (tmp_path / "out" / "clean").exists()
