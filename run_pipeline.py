"""Run the whole pipeline with one command: clean encoder -> BadEncoder -> MIMIC -> ACC/ASR.

    python run_pipeline.py                   # the CPU demo on generated data (about 15 minutes on 2 cores)
    python run_pipeline.py --preset paper    # the paper's settings on prepared CIFAR-10/GTSRB/SVHN/STL-10 (GPU)
    python run_pipeline.py --preset paper --nproc_per_node 4   # the same, training stages on 4 GPUs

Each stage is one of the four scripts, called as a user would (the command is printed first).
Besides the clean, backdoored and purified encoders, two controls are evaluated: a student trained
on the same clean subset with the contrastive loss alone (no teacher), and MIMIC with uniform
attention weights (no MI). A stage whose folder already holds results.json is skipped; one with
a checkpoint.pth is resumed. Writes <results_dir>/summary.json and summary.md.
Extra flags for a stage go after --clean_args/--badencoder_args/--mimic_args/--downstream_args,
e.g. --mimic_args "--epochs 50 --lr 5e-3" (later flags win).
"""
import argparse
import ctypes
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from datasets import demo
from datasets.npz import split_path
from utils.cli import run_cli
from utils.errors import UserError
from utils.files import save_json

ROOT = Path(__file__).resolve().parent
TRIGGER = "trigger/trigger_pt_white_21_10_ap_replace.npz"

# CPU demo: small width and few images, chosen so the whole run fits in 15 minutes on 2 cores (14 measured).
DEMO = {
    "pretraining_dataset": demo.PRETRAIN_NAME,
    "tasks": [{"dataset": demo.DOWNSTREAM_NAME, "label": demo.DEFAULTS["target_class"],
               "reference": f"reference/demo/{demo.DOWNSTREAM_CLASSES[demo.DEFAULTS['target_class']]}.npz"}],
    "clean": ["--epochs", "10", "--width", "16", "--knn_freq", "5"],
    "badencoder": ["--epochs", "3", "--lr", "2e-2"],
    "mimic": ["--epochs", "20", "--ratio", "0.2", "--lr", "1e-3", "--mi_epochs", "20"],
    "downstream": ["--nn_epochs", "100", "--lr", "1e-3"],
    "global_batch": {"clean": 128, "badencoder": 64, "mimic": 128},
}
# The paper's settings (every stage at its defaults), one backdoor per downstream task.
PAPER = {
    "pretraining_dataset": "cifar10",
    "tasks": [{"dataset": "gtsrb", "label": 12, "reference": "reference/cifar10/priority.npz"},
              {"dataset": "svhn", "label": 1, "reference": "reference/cifar10/one.npz"},
              {"dataset": "stl10", "label": 9, "reference": "reference/cifar10/truck.npz"}],
    "clean": ["--lr", "1e-3"], "badencoder": [],
    "mimic": ["--lr", "1e-2", "--epochs", "1000", "--ratio", "0.04"],
    "downstream": ["--nn_epochs", "1000"],
    "global_batch": {"clean": 256, "badencoder": 256, "mimic": 128},
}
PRESETS = {"demo": DEMO, "paper": PAPER}
# The students trained from each backdoored encoder by MIMIC.py: (label, folder, flags). Each is
# trained in <folder>_<task> and evaluated in eval/<folder>_<task>. The no-teacher control has
# attention transfer and cloning switched off, so only InfoNCE trains it.
NO_TEACHER = ["--attention", "uniform", "--mi_scale", "0", "--at_base_layer1", "0", "--at_base_layer2", "0",
              "--at_base_layer3", "0", "--at_base_layer4", "0", "--clone_weight", "0"]
STUDENTS = [("MIMIC", "mimic", []),
            ("no-teacher control", "no_teacher", NO_TEACHER),
            ("uniform-weights control", "uniform", ["--attention", "uniform"])]


def get_parser():
    parser = argparse.ArgumentParser(description="Run stages 0-3, two controls, and summarise ACC/ASR.")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="demo: generated data, CPU-sized; paper: the paper's settings on prepared "
                             "real data, for a GPU (default: demo)")
    parser.add_argument("--results_dir", default=None, help="where every stage writes (default: output/<preset>)")
    parser.add_argument("--data_dir", default="data", help="dataset folder (default: data)")
    parser.add_argument("--device", default="auto", help="passed to every stage (default: auto)")
    parser.add_argument("--seed", type=int, default=100, help="passed to every stage (default: 100)")
    parser.add_argument("--no_controls", action="store_true", help="skip the two control students")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes (GPUs) per training stage; above 1 the stages run under "
                             "torchrun and each process gets global batch / N images per step "
                             "(default: 1)")
    for stage in ("clean", "badencoder", "mimic", "downstream"):
        parser.add_argument(f"--{stage}_args", default="",
                            help=f"extra flags appended to every {stage} command (default: none)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


class Runner:
    """Runs stage scripts as subprocesses, skipping finished ones and timing the rest."""

    def __init__(self, out_dir, common, nproc=1):
        self.out_dir, self.common, self.nproc = out_dir, common, nproc
        self.times_path = out_dir / "stage_times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def launcher(self, parallel):
        """How a stage is started: python, or torchrun with nproc processes for a training stage."""
        if parallel and self.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc}"]
        return [sys.executable, "-u"]

    def stage(self, name, script, args, stage_dir, parallel=False):
        """Run one stage into stage_dir unless it finished there with the same flags; returns its
        results.json with "encoder" as a full path."""
        command = [script, *map(str, args), *self.common]
        record = stage_dir / "runner.json"
        if record.exists() and (stage_dir / "checkpoint.pth").exists():
            previous = json.loads(record.read_text())["command"]
            if previous != command:
                raise UserError(f"{stage_dir} holds stage {name!r} run with other flags "
                                f"({flag_changes(previous, command)}); pass the same flags, or remove "
                                f"the folder to run the stage again")
        results_path = stage_dir / "results.json"
        if results_path.exists():
            results = with_encoder_path(stage_dir, json.loads(results_path.read_text()))
            if Path(results.get("encoder", results_path)).exists():
                print(f"\n== {name}: done earlier ({results_path}), skipped")
                return results
            print(f"\n== {name}: {results['encoder']} is missing; running the stage again")
        if (stage_dir / "checkpoint.pth").exists():
            args = args + ["--resume"]
        elif stage_dir.exists():
            args = args + ["--overwrite"]
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_json(record, {"command": command})
        cmd = [*self.launcher(parallel), script, *map(str, args), *self.common, "--results_dir", str(stage_dir)]
        print(f"\n== {name}\n$ {shlex.join(cmd[1:])}", flush=True)
        t0 = time.time()
        if run_child(cmd) != 0:
            raise UserError(f"stage {name!r} failed (command above); fix it and run again to continue")
        self.times[name] = round(time.time() - t0, 1)
        save_json(self.times_path, self.times)
        return with_encoder_path(stage_dir, json.loads(results_path.read_text()))


def with_encoder_path(stage_dir, results):
    """results.json names its encoder relative to its own folder; make it a full path."""
    if "encoder" in results:
        results = {**results, "encoder": str(stage_dir / results["encoder"])}
    return results


def flag_changes(previous, command):
    """A short description of how two stage commands differ."""
    gone = [t for t in previous if t not in command]
    new = [t for t in command if t not in previous]
    return f"before: {' '.join(gone) or '-'}; now: {' '.join(new) or '-'}"


def _die_with_parent():
    """In the child: ask Linux to end it when the runner dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(cmd):
    """Run a stage and wait for it; if the runner is interrupted, the stage is stopped too, so a
    re-run never finds a second writer in the stage's folder."""
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def batch_args(preset, stage, nproc):
    """--batch_size for one process of a stage: the preset's global batch shared among nproc."""
    batch = preset["global_batch"][stage]
    if batch % nproc:
        raise UserError(f"the {stage} stage's global batch of {batch} does not split among "
                        f"--nproc_per_node {nproc} processes; choose a divisor of {batch}")
    return ["--batch_size", str(batch // nproc)]


def check_demo(rows):
    """The science the demo must show; returns (description, passed) pairs."""
    clean, bad, mimic, no_teacher = (rows.get(k) for k in ("clean", "backdoored", "MIMIC", "no-teacher control"))
    checks = [(f"clean ACC {clean['acc']:.1f} >= 60", clean["acc"] >= 60),
              (f"backdoored ASR {bad['asr']:.1f} >= 90", bad["asr"] >= 90),
              (f"backdoored ACC {bad['acc']:.1f} within 5 of clean {clean['acc']:.1f}",
               abs(bad["acc"] - clean["acc"]) <= 5)]
    limit = max(20.0, 2 * clean["asr"])
    checks.append((f"MIMIC ASR {mimic['asr']:.1f} <= {limit:.1f}", mimic["asr"] <= limit))
    checks.append((f"MIMIC ACC {mimic['acc']:.1f} >= clean - 10 = {clean['acc'] - 10:.1f}",
                   mimic["acc"] >= clean["acc"] - 10))
    if no_teacher is not None:
        checks.append((f"MIMIC ACC {mimic['acc']:.1f} > no-teacher ACC {no_teacher['acc']:.1f}",
                       mimic["acc"] > no_teacher["acc"]))
    return checks


def markdown(task_rows, times):
    lines = []
    for task, rows in task_rows.items():
        lines += [f"### {task}", "", "| encoder | ACC (%) | ASR (%) | ASR excl. target (%) |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r['acc']:.2f} | {r['asr']:.2f} | {r['asr_excluding_target']:.2f} |"
                  for name, r in rows.items()]
        lines.append("")
    lines += ["| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {t:.1f} |" for name, t in times.items()]
    return "\n".join(lines) + "\n"


def main(args):
    preset = PRESETS[args.preset]
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    batch = {s: batch_args(preset, s, args.nproc_per_node) for s in preset["global_batch"]}
    out_dir = Path(args.results_dir or f"output/{args.preset}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    if args.preset == "demo":
        print("== demo data")
        demo.make_demo_data(data_dir, ROOT / "reference", **demo.DEFAULTS)
    else:
        needed = [split_path(data_dir, preset["pretraining_dataset"], "train")]
        needed += [split_path(data_dir, t["dataset"], s) for t in preset["tasks"] for s in ("train", "test")]
        needed += [ROOT / t["reference"] for t in preset["tasks"]]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise UserError("the paper preset needs prepared data; missing: " + ", ".join(missing)
                            + ". Create it with: python prepare_data.py --dataset all --download --references")

    common = ["--data_dir", str(data_dir), "--device", args.device, "--seed", str(args.seed)]
    extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in ("clean", "badencoder", "mimic", "downstream")}
    runner = Runner(out_dir, common, args.nproc_per_node)
    ds = preset["pretraining_dataset"]
    clean = runner.stage("stage 0: clean encoder", "train_clean_encoder.py",
                         ["--pretraining_dataset", ds, *preset["clean"], *batch["clean"], *extra["clean"]],
                         out_dir / "clean", parallel=True)
    task_rows = {}
    for task in preset["tasks"]:
        name = task["dataset"]
        bad = runner.stage(f"stage 1: BadEncoder ({name})", "train_badencoder.py",
                           ["--pretraining_dataset", ds, "--downstreamTask", name, "--trigger_file", TRIGGER,
                            "--reference_file", task["reference"], "--pretrained_encoder", clean["encoder"],
                            *preset["badencoder"], *batch["badencoder"], *extra["badencoder"]],
                           out_dir / f"badencoder_{name}", parallel=True)
        students = STUDENTS[:1] if args.no_controls else STUDENTS
        encoders = [("clean", "clean", clean["encoder"]), ("backdoored", "backdoored", bad["encoder"])]
        for label, folder, flags in students:
            res = runner.stage(f"stage 2: {label} ({name})", "MIMIC.py",
                               ["--pretraining_dataset", ds, "--teacher", bad["encoder"],
                                *preset["mimic"], *batch["mimic"], *extra["mimic"], *flags],
                               out_dir / f"{folder}_{name}", parallel=True)
            encoders.append((label, folder, res["encoder"]))
        rows = {}
        for label, folder, encoder in encoders:
            rows[label] = runner.stage(
                f"stage 3: {label} on {name}", "training_downstream_classifier.py",
                ["--dataset", name, "--reference_label", task["label"], "--trigger_file", TRIGGER,
                 "--encoder_usage_info", ds, "--encoder", encoder, "--reference_file", task["reference"],
                 *preset["downstream"], *extra["downstream"]], out_dir / "eval" / f"{folder}_{name}")
        task_rows[f"{name} (target {task['label']})"] = rows

    table = markdown(task_rows, runner.times)
    summary = {"preset": args.preset, "results": {t: {k: {m: r[m] for m in ("acc", "asr", "asr_excluding_target")}
                                                    for k, r in rows.items()} for t, rows in task_rows.items()},
               "stage_seconds": runner.times, "total_seconds": round(sum(runner.times.values()), 1)}
    if args.preset == "demo":
        checks = check_demo(next(iter(task_rows.values())))
        summary["checks"] = [{"check": c, "passed": ok} for c, ok in checks]
        table += "\n" + "\n".join(f"- [{'x' if ok else ' '}] {c}" for c, ok in checks) + "\n"
    save_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(table)
    print("\n" + table)
    print(f"total stage time {summary['total_seconds']:.0f} s; summary in {out_dir / 'summary.md'}")


if __name__ == "__main__":
    run_cli(main, get_parser())
