"""Run the whole pipeline with one command: clean encoder -> BadEncoder -> MIMIC and the baseline
defences -> ACC/ASR, over one seed or several.

    python run_pipeline.py                   # the CPU demo on generated data (see DEMO for its time)
    python run_pipeline.py --preset paper    # the paper's settings on prepared CIFAR-10/GTSRB/SVHN/STL-10 (GPU)
    python run_pipeline.py --preset paper --tasks gtsrb,svhn --seeds 1 2 3   # two of its tasks, three seeds
    python run_pipeline.py --preset paper --nproc_per_node 4   # training stages on 4 GPUs
    python run_pipeline.py --pretraining_dataset mine --task mine:1   # your own data, made with
                                             # python prepare_data.py --image_folder DIR --name mine

Each stage is one of the stage scripts, called as a user would (the command is printed first).
Besides the clean, backdoored and MIMIC encoders, three baseline defences (defenses.py: FT, FP,
NAD) and two controls are evaluated: a student trained on the same clean subset with the
contrastive loss alone (no teacher), and MIMIC with uniform attention weights (no MI). A stage
whose folder already holds results.json is skipped; one with a checkpoint.pth is resumed.

Writes <results_dir>/summary.json, summary.md (ACC/ASR per encoder, MIMIC's MI per block with the
estimator's verdict) and figures/*.png. With --seeds, each seed runs in <results_dir>/seed_<s>/
(laid out as a single run, with its own summary) and the top-level summary gives per-seed values,
mean, sample std and MIMIC's paired differences from every control and defence.
Extra flags for a stage go after --clean_args/--badencoder_args/--mimic_args/--defense_args/
--downstream_args, e.g. --mimic_args "--epochs 50 --lr 5e-3" (later flags win).
"""
import argparse
import ctypes
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from datasets import demo, load_reference, load_split, load_trigger, pretraining_split, stamp_trigger
from datasets.augment import BatchAugment
from datasets.npz import npz_shape, split_path
from datasets.prepare import PAPER_DATASETS, PAPER_REFERENCES, make_reference, reference_path
from report.figures import plot_results, sample_grid
from report.stats import (BASELINES, markdown_mi_table, markdown_seed_table, mi_not_converged, paired_differences,
                          summarize_seeds)
from utils.cli import run_cli, seed_int
from utils.errors import UserError
from utils.files import save_json
from utils.seeding import preserved_rng

ROOT = Path(__file__).resolve().parent
TRIGGER = "trigger/trigger_pt_white_21_10_ap_replace.npz"
METRICS = ("acc", "asr", "asr_excluding_target")

# The baseline defences of defenses.py (--defense) and their rows in the tables.
DEFENSES = {"finetune": "FT", "fine_pruning": "FP", "nad": "NAD"}
METHODS = ("mimic", *DEFENSES)

# CPU demo: small width and few images (sizes and timings: docs/measurements.md). Every defence
# reads the same clean subset, the first 20% of the pre-training images. MIMIC and its two
# controls train a fresh student for 30 epochs; the baselines start from the trained suspect
# encoder and fine-tune it for 10. The downstream MLP trains for 200 epochs: at 100 the students'
# ACC was still rising by about 5 points.
DEMO_SUBSET = ["--ratio", "0.2"]
DEMO_BASELINE = [*DEMO_SUBSET, "--epochs", "10", "--lr", "1e-3"]
DEMO = {
    "pretraining_dataset": demo.PRETRAIN_NAME,
    "tasks": [{"dataset": demo.DOWNSTREAM_NAME, "label": demo.DEFAULTS["target_class"],
               "reference": f"reference/demo/{demo.DOWNSTREAM_CLASSES[demo.DEFAULTS['target_class']]}.npz"}],
    "clean": ["--epochs", "10", "--width", "16", "--knn_freq", "5", "--lr", "3e-3"],
    "badencoder": ["--epochs", "5", "--lr", "5e-2"],
    "mimic": [*DEMO_SUBSET, "--epochs", "30", "--lr", "3e-3", "--mi_epochs", "60"],
    # NAD's teacher is a shorter fine-tuning run on the same subset.
    "defenses": {"finetune": DEMO_BASELINE, "fine_pruning": DEMO_BASELINE,
                 "nad": [*DEMO_BASELINE, "--nad_teacher_epochs", "5"]},
    "downstream": ["--nn_epochs", "200", "--lr", "1e-3"],
    "global_batch": {"clean": 128, "badencoder": 64, "mimic": 128, "defense": 128},
}
# The paper's settings (every stage at its defaults), one backdoor per downstream task; the
# defences at their own defaults on MIMIC's clean subset (4% of CIFAR-10).
PAPER_DEFENSE = ["--ratio", "0.04"]
PAPER = {
    "pretraining_dataset": "cifar10",
    "tasks": [{"dataset": "gtsrb", "label": 12, "reference": "reference/cifar10/priority.npz"},
              {"dataset": "svhn", "label": 1, "reference": "reference/cifar10/one.npz"},
              {"dataset": "stl10", "label": 9, "reference": "reference/cifar10/truck.npz"}],
    "clean": ["--lr", "1e-3"], "badencoder": [],
    "mimic": ["--lr", "1e-2", "--epochs", "1000", "--ratio", "0.04"],
    "defenses": {"finetune": PAPER_DEFENSE, "fine_pruning": PAPER_DEFENSE, "nad": PAPER_DEFENSE},
    "downstream": ["--nn_epochs", "1000"],
    "global_batch": {"clean": 256, "badencoder": 256, "mimic": 128, "defense": 128},
}
PRESETS = {"demo": DEMO, "paper": PAPER}
STAGE_ARGS = ("clean", "badencoder", "mimic", "defense", "downstream")
# The students trained from each backdoored encoder by MIMIC.py: (label, folder, flags). Each is
# trained in <folder>_<task> and evaluated in eval/<folder>_<task>. The no-teacher control has
# attention transfer and cloning switched off, so only InfoNCE trains it.
NO_TEACHER = ["--attention", "uniform", "--mi_scale", "0", "--at_base_layer1", "0", "--at_base_layer2", "0",
              "--at_base_layer3", "0", "--at_base_layer4", "0", "--clone_weight", "0"]
STUDENTS = [("MIMIC", "mimic", []),
            ("no-teacher control", "no_teacher", NO_TEACHER),
            ("uniform-weights control", "uniform", ["--attention", "uniform"])]


def method_list(text):
    """--defenses: comma-separated names of METHODS, in the given order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose among {','.join(METHODS)}")
    return list(dict.fromkeys(names))


def name_list(text):
    """--tasks: comma-separated dataset names."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def task_spec(text):
    """--task DATASET:LABEL[:REFERENCE] -> {"dataset", "label", "reference" (full path or None)}."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected DATASET:LABEL[:REFERENCE], got {text!r}")
    try:
        label = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"LABEL must be an integer class, got {parts[1]!r} in {text!r}") from None
    reference = str(Path(parts[2]).resolve()) if len(parts) == 3 and parts[2] else None
    return {"dataset": parts[0], "label": label, "reference": reference}


def get_parser():
    parser = argparse.ArgumentParser(description="Run stages 0-3, the defences and two controls; summarise "
                                                 "ACC/ASR over one or more seeds.")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="demo: generated data, CPU-sized; paper: the paper's settings on prepared "
                             "real data, for a GPU. With --pretraining_dataset/--task it supplies only the "
                             "stage flags (default: demo)")
    parser.add_argument("--results_dir", default=None, help="where every stage writes (default: output/<preset>)")
    parser.add_argument("--device", default="auto", help="passed to every stage (default: auto)")
    parser.add_argument("--seed", type=seed_int, default=100, help="passed to every stage (default: 100)")
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=None, metavar="S",
                        help="run the whole pipeline once per seed in <results_dir>/seed_<s>/ and summarise "
                             "over the seeds (mean, sample std, MIMIC's paired differences); finished seeds "
                             "are skipped on a re-run (default: --seed alone, written to <results_dir>/)")
    parser.add_argument("--defenses", type=method_list, default=list(METHODS), metavar="LIST",
                        help="comma-separated methods run on each backdoored encoder: mimic (MIMIC.py) and "
                             "the baselines finetune, fine_pruning, nad (defenses.py) "
                             f"(default: {','.join(METHODS)})")
    parser.add_argument("--no_controls", action="store_true", help="skip the two control students")
    data = parser.add_argument_group("data (default: the preset's)")
    data.add_argument("--data_dir", default="data", help="dataset folder (default: data)")
    data.add_argument("--pretraining_dataset", default=None,
                      help="dataset under --data_dir the encoders are pre-trained on, e.g. one made by "
                           "prepare_data.py --image_folder (default: the preset's)")
    data.add_argument("--task", type=task_spec, action="append", default=None, metavar="DATASET:LABEL[:REFERENCE]",
                      help="a downstream task (repeatable): dataset under --data_dir, the attacker's target "
                           "label and its reference file; without REFERENCE the first train image of the "
                           "label becomes <reference_dir>/<pretraining_dataset>/<dataset>_<label>.npz "
                           "(default: the preset's tasks)")
    data.add_argument("--reference_dir", default=str(ROOT / "reference"),
                      help="where the reference files of --task without REFERENCE are made "
                           "(default: reference/ of this repository)")
    data.add_argument("--tasks", type=name_list, default=None, metavar="LIST",
                      help="comma-separated subset of the preset's tasks, by downstream dataset, e.g. "
                           "gtsrb,svhn (default: all of them)")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes (GPUs) per training stage; above 1 the stages run under "
                             "torchrun and each process gets global batch / N images per step "
                             "(default: 1)")
    for stage in STAGE_ARGS:
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
        self.outputs = []   # results.json and encoder of every stage this runner returned

    def finished(self, stage_dir):
        """results.json of a stage (encoder as a full path), remembered in self.outputs."""
        results = with_encoder_path(stage_dir, json.loads((stage_dir / "results.json").read_text()))
        self.outputs += [stage_dir / "results.json", *([Path(results["encoder"])] if "encoder" in results else [])]
        return results

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
                return self.finished(stage_dir)
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
        return self.finished(stage_dir)


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


# ---------------------------------------------------------------- which data, checked before any work

def select_data(args, preset):
    """(pretraining dataset, tasks) of this run: the preset's, a subset of its tasks (--tasks), or the
    user's own (--pretraining_dataset, --task). A task's "reference" is None when one is to be made."""
    tasks = preset["tasks"]
    if args.task and args.tasks:
        raise UserError("--tasks picks among the preset's tasks and --task names your own; pass one of them")
    if args.tasks:
        known = {t["dataset"]: t for t in tasks}
        unknown = [n for n in args.tasks if n not in known]
        if unknown:
            raise UserError(f"--tasks: the {args.preset} preset has no task {', '.join(unknown)} "
                            f"(its tasks: {', '.join(known)})")
        tasks = [known[n] for n in args.tasks]
    tasks = args.task or tasks
    names = [t["dataset"] for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:   # every stage folder is named after the downstream dataset
        raise UserError(f"--task names {twice[0]} more than once; one target label per downstream dataset "
                        f"and results folder (use another --results_dir for the other label)")
    return args.pretraining_dataset or preset["pretraining_dataset"], [dict(t) for t in tasks]


def npz_labels(path):
    """The labels (y) of a split, flattened."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz["y"]).ravel()
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"cannot read the labels of {path}: {err}") from None


def prepare_commands(missing_splits, missing_refs, data_dir):
    """The commands that create the missing dataset folders and reference files (the authors'
    released reference files are shipped in the repository: git restores them)."""
    paper = [n for n in missing_splits if n in PAPER_DATASETS]
    paper_refs = [p for p in missing_refs
                  if p in {reference_path(ROOT / "reference", u, n) for u, n, _, _ in PAPER_REFERENCES}]
    commands = []
    if paper:
        which = ["all"] if set(paper) == set(PAPER_DATASETS) else paper
        commands.append(" ".join(["python prepare_data.py", "--dataset", *which, "--download", "--out", str(data_dir)]))
    if paper_refs:
        commands.append(" ".join(["git checkout --", *(str(p.relative_to(ROOT)) for p in paper_refs)]))
    commands += [f"python prepare_data.py --image_folder DIR --name {n} --out {data_dir}"
                 for n in missing_splits if n not in PAPER_DATASETS]
    if len(paper_refs) < len(missing_refs):
        commands.append("python prepare_data.py --make_reference DATASET LABEL NAME --pretraining_dataset P "
                        "(or leave REFERENCE out of --task to have one made)")
    return "; ".join(commands)


def check_data(pretraining, tasks, data_dir, who):
    """One clear line for the first problem: missing files, a target label absent from the task's
    labels, a trigger of another size than the images."""
    splits = [(pretraining, s) for s in dict.fromkeys(("train", pretraining_split(pretraining)))]
    splits += [(t["dataset"], s) for t in tasks for s in ("train", "test")]
    missing = [split_path(data_dir, n, s) for n, s in splits if not split_path(data_dir, n, s).exists()]
    missing_refs = [ROOT / t["reference"] for t in tasks
                    if t["reference"] is not None and not (ROOT / t["reference"]).exists()]
    if missing or missing_refs:
        names = list(dict.fromkeys(p.parent.name for p in missing))
        raise UserError(f"{who} needs prepared data; missing: {', '.join(map(str, missing + missing_refs))}. "
                        f"Create it with: {prepare_commands(names, missing_refs, data_dir)}")
    for t in tasks:
        for split in ("test",) if t["reference"] else ("test", "train"):
            path = split_path(data_dir, t["dataset"], split)
            labels = npz_labels(path)
            if t["label"] not in labels:
                raise UserError(f"label {t['label']} does not occur in {path} (its labels run from "
                                f"{labels.min()} to {labels.max()})")
    trigger, _ = load_trigger(ROOT / TRIGGER)
    for name, split in [(pretraining, "train")] + [(t["dataset"], "test") for t in tasks]:
        path = split_path(data_dir, name, split)
        size = tuple(npz_shape(path, "x")[1:3])
        if size != trigger.shape[:2]:
            raise UserError(f"the trigger {TRIGGER} is {trigger.shape[0]}x{trigger.shape[1]} pixels but the "
                            f"images of {path} are {size[0]}x{size[1]}; prepare the dataset at "
                            f"{trigger.shape[0]}x{trigger.shape[1]} (prepare_data.py does)")


def add_references(pretraining, tasks, data_dir, reference_dir):
    """Give every task without a reference file the first train image of its target label, as
    prepare_data.py --make_reference --reference_pick first does, in
    <reference_dir>/<pretraining>/<dataset>_<label>.npz (an existing valid file is kept)."""
    for t in tasks:
        if t["reference"] is None:
            path = reference_path(Path(reference_dir).resolve(), pretraining, f"{t['dataset']}_{t['label']}")
            row = make_reference(data_dir, t["dataset"], t["label"], path, pick="first")
            print(f"reference of {t['dataset']} label {t['label']}: {path} ({row['status']})")
            t["reference"] = str(path)


# ---------------------------------------------------------------- one seed

@dataclass
class Plan:
    """What every seed runs: the data, each stage's flags, and which students and defences."""
    preset_name: str
    preset: dict
    pretraining: str
    tasks: list
    methods: list
    controls: bool
    extra: dict
    batch: dict
    data_dir: str
    device: str
    nproc: int
    demo_checks: bool

    def config(self):
        """Everything that decides a seed's numbers, as JSON would return it (to compare with a summary)."""
        return json.loads(json.dumps(asdict(self)))

    def students(self):
        """The MIMIC.py runs of each task: MIMIC if asked for, the controls unless --no_controls."""
        return [s for s in STUDENTS if ("mimic" in self.methods if s[1] == "mimic" else self.controls)]


def task_key(task):
    return f"{task['dataset']} (target {task['label']})"


def mi_record(mi_path):
    """{block: {"mi", "weight", "convergence"}} of a MIMIC run's mi.json; convergence is the
    estimator's verdict ("converged", "rising", ...) or None when not recorded."""
    mi = json.loads(Path(mi_path).read_text())
    reasons = [c["reason"] for c in mi["convergence"]] if mi.get("convergence") else [None] * len(mi["mi"])
    return {block: {"mi": value, "weight": weight, "convergence": reason}
            for block, value, weight, reason in zip(mi["blocks"], mi["mi"], mi["weights"], reasons)}


def run_task(runner, plan, task, clean_encoder, out_dir):
    """Stages 1-3 of one downstream task: ({row label: results.json}, MIMIC's MI record or None)."""
    ds, name, preset = plan.pretraining, task["dataset"], plan.preset
    bad = runner.stage(f"stage 1: BadEncoder ({name})", "train_badencoder.py",
                       ["--pretraining_dataset", ds, "--downstreamTask", name, "--trigger_file", TRIGGER,
                        "--reference_file", task["reference"], "--pretrained_encoder", clean_encoder,
                        *preset["badencoder"], *plan.batch["badencoder"], *plan.extra["badencoder"]],
                       out_dir / f"badencoder_{name}", parallel=True)
    encoders = [("clean", "clean", clean_encoder), ("backdoored", "backdoored", bad["encoder"])]
    for label, folder, flags in plan.students():
        res = runner.stage(f"stage 2: {label} ({name})", "MIMIC.py",
                           ["--pretraining_dataset", ds, "--teacher", bad["encoder"],
                            *preset["mimic"], *plan.batch["mimic"], *plan.extra["mimic"], *flags],
                           out_dir / f"{folder}_{name}", parallel=True)
        encoders.append((label, folder, res["encoder"]))
    for defense in (m for m in plan.methods if m in DEFENSES):
        res = runner.stage(f"stage 2: {DEFENSES[defense]} ({name})", "defenses.py",
                           ["--defense", defense, "--suspect", bad["encoder"], "--pretraining_dataset", ds,
                            *preset["defenses"][defense], *plan.batch["defense"], *plan.extra["defense"]],
                           out_dir / f"{defense}_{name}", parallel=True)
        encoders.append((DEFENSES[defense], defense, res["encoder"]))
    rows = {}
    for label, folder, encoder in encoders:
        rows[label] = runner.stage(
            f"stage 3: {label} on {name}", "training_downstream_classifier.py",
            ["--dataset", name, "--reference_label", task["label"], "--trigger_file", TRIGGER,
             "--encoder", encoder, "--reference_file", task["reference"],
             *preset["downstream"], *plan.extra["downstream"]], out_dir / "eval" / f"{folder}_{name}")
    mi_path = out_dir / f"mimic_{name}" / "mi.json"
    return rows, mi_record(mi_path) if "mimic" in plan.methods and mi_path.exists() else None


def read_summary(folder):
    """A folder's summary.json, {} when absent or unreadable."""
    try:
        return json.loads((Path(folder) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def up_to_date(summary, out_dir):
    """Whether a seed's summary still describes its folder: summary.md is there, and every stage
    output it was made from exists and is not newer (a removed or re-run stage makes it stale)."""
    made = out_dir / "summary.json"
    outputs = [Path(f) for f in summary.get("stage_outputs", [])]
    return (bool(outputs) and (out_dir / "summary.md").exists()
            and all(f.exists() and f.stat().st_mtime <= made.stat().st_mtime for f in outputs))


def run_seed(plan, seed, out_dir):
    """Every stage of one seed into out_dir; writes and returns its summary. The summary of a
    finished seed (same plan, stages untouched since) is read back instead."""
    done = read_summary(out_dir)
    if done.get("seed") == seed and done.get("config") == plan.config() and up_to_date(done, out_dir):
        print(f"\n== seed {seed}: done earlier ({out_dir / 'summary.json'}), skipped")
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(out_dir, ["--data_dir", plan.data_dir, "--device", plan.device, "--seed", str(seed)], plan.nproc)
    clean = runner.stage("stage 0: clean encoder", "train_clean_encoder.py",
                         ["--pretraining_dataset", plan.pretraining, *plan.preset["clean"], *plan.batch["clean"],
                          *plan.extra["clean"]], out_dir / "clean", parallel=True)
    results, mi = {}, {}
    for task in plan.tasks:
        rows, record = run_task(runner, plan, task, clean["encoder"], out_dir)
        results[task_key(task)] = {label: {m: r[m] for m in METRICS} for label, r in rows.items()}
        if record is not None:
            mi[task_key(task)] = record
    summary = {"preset": plan.preset_name, "seed": seed, "results": results, "mi": mi,
               "mi_not_converged": mi_not_converged({seed: mi}), "stage_seconds": runner.times,
               "total_seconds": round(sum(runner.times.values()), 1), "config": plan.config(),
               "stage_outputs": list(map(str, runner.outputs))}
    table = markdown(results, runner.times)
    if plan.demo_checks:
        checks = check_demo(next(iter(results.values())))
        summary["checks"] = [{"check": c, "passed": ok} for c, ok in checks]
        table += "\n" + checklist(summary["checks"])
    table += "\n" + markdown_mi_table({seed: mi})
    save_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(table)
    return summary


def check_demo(rows):
    """The science the demo must show; returns (description, passed) pairs. MIMIC's checks need its row."""
    clean, bad, mimic, no_teacher = (rows.get(k) for k in ("clean", "backdoored", "MIMIC", "no-teacher control"))
    checks = [(f"clean ACC {clean['acc']:.1f} >= 60", clean["acc"] >= 60),
              (f"backdoored ASR {bad['asr']:.1f} >= 90", bad["asr"] >= 90),
              (f"backdoored ACC {bad['acc']:.1f} within 5 of clean {clean['acc']:.1f}",
               abs(bad["acc"] - clean["acc"]) <= 5)]
    if mimic is None:
        return checks
    limit = max(20.0, 2 * clean["asr"])
    checks.append((f"MIMIC ASR {mimic['asr']:.1f} <= {limit:.1f}", mimic["asr"] <= limit))
    checks.append((f"MIMIC ACC {mimic['acc']:.1f} >= clean - 10 = {clean['acc'] - 10:.1f}",
                   mimic["acc"] >= clean["acc"] - 10))
    if no_teacher is not None:
        checks.append((f"MIMIC ACC {mimic['acc']:.1f} > no-teacher ACC {no_teacher['acc']:.1f}",
                       mimic["acc"] > no_teacher["acc"]))
    return checks


def checklist(checks):
    return "\n".join(f"- [{'x' if c['passed'] else ' '}] {c['check']}" for c in checks) + "\n"


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


# ---------------------------------------------------------------- several seeds

def seed_summary(per_seed):
    """Summary over seeds of {seed: per-seed summary}: (summary.json dict, summary.md text).

    Per task, encoder and metric: per-seed values, mean and sample std; MIMIC minus every other
    row except clean and backdoored (the controls and the defences), paired by seed."""
    results = {seed: s["results"] for seed, s in per_seed.items()}
    stats = summarize_seeds(results)
    encoders = list(dict.fromkeys(e for rows in stats.values() for e in rows))
    against = [e for e in encoders if e != "MIMIC" and e not in BASELINES]
    paired = paired_differences(results, reference="MIMIC", against=against) if "MIMIC" in encoders else {}
    mi = {seed: s.get("mi", {}) for seed, s in per_seed.items()}
    summary = {"preset": next(iter(per_seed.values()))["preset"], "seeds": list(per_seed), "stats": stats,
               "paired_differences": paired, "mi": mi, "mi_not_converged": mi_not_converged(mi),
               "seed_seconds": {seed: s["total_seconds"] for seed, s in per_seed.items()}}
    seeds = ", ".join(map(str, per_seed))
    text = f"## Over seeds {seeds}: mean ± sample std\n\n" + markdown_seed_table(stats, paired) + "\n"
    checks = {seed: s["checks"] for seed, s in per_seed.items() if "checks" in s}
    if checks:
        summary["checks"] = checks
        text += "".join(f"\n### Demo checks, seed {seed}\n\n" + checklist(c) for seed, c in checks.items())
    text += "\n" + markdown_mi_table(mi)
    text += "\n| seed | stage time (s) |\n|---|---|\n" + "".join(
        f"| {seed} | {t:.1f} |\n" for seed, t in summary["seed_seconds"].items())
    return summary, text


# ---------------------------------------------------------------- figures

def sample_images(plan, seed, count=8):
    """The sample grid's rows as uint8 (N, H, W, 3): pre-training images, the first task's test
    images with the trigger, its reference inputs, and two augmented views of the pre-training images."""
    clean = load_split(plan.data_dir, plan.pretraining, "train")[0][:count]
    task = plan.tasks[0]
    test = load_split(plan.data_dir, task["dataset"], "test")[0][:count]
    t, tm = load_trigger(ROOT / TRIGGER, test.shape[1:3])
    reference, _ = load_reference(ROOT / task["reference"])
    augment = BatchAugment(clean.shape[1], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))   # views stay in [0, 1]
    with preserved_rng():
        torch.manual_seed(seed)
        views = [augment(torch.from_numpy(clean)) for _ in range(2)]   # Nx3xHxW
    views = [v.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for v in views]
    return clean, stamp_trigger(test, t, tm), reference, *views


def draw_figures(out_dir, plan, seed):
    """figures/*.png of the results folder and figures/samples.png; a failure costs one warning
    line, never the numbers (written before)."""
    written = []
    drawings = (("figures", lambda: plot_results(out_dir)),
                ("sample images", lambda: [sample_grid(*sample_images(plan, seed), out_dir / "figures" / "samples.png")]))
    for what, draw in drawings:
        try:
            written += draw()
        except Exception as error:   # any plotting failure: the summary is saved already
            print(f"warning: {what} not drawn ({type(error).__name__}: {error})")
    if written:
        print("figures:\n" + "\n".join(f"  {p}" for p in written))
    return written


def main(args):
    preset = PRESETS[args.preset]
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    batch = {s: batch_args(preset, s, args.nproc_per_node) for s in preset["global_batch"]}
    pretraining, tasks = select_data(args, preset)
    own = bool(args.pretraining_dataset or args.task)
    out_dir = Path(args.results_dir or f"output/{args.preset}").resolve()
    data_dir = Path(args.data_dir).resolve()
    if {pretraining, *(t["dataset"] for t in tasks)} & set(demo.CLASSES):
        print("== demo data")
        demo.make_demo_data(data_dir, ROOT / "reference", **demo.DEFAULTS)
    check_data(pretraining, tasks, data_dir, "this run" if own else f"the {args.preset} preset")
    add_references(pretraining, tasks, data_dir, args.reference_dir)

    extra = {s: shlex.split(getattr(args, f"{s}_args")) for s in STAGE_ARGS}
    plan = Plan(args.preset, preset, pretraining, tasks, args.defenses, not args.no_controls, extra, batch,
                str(data_dir), args.device, args.nproc_per_node, demo_checks=args.preset == "demo" and not own)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.seeds is None:
        summary = run_seed(plan, args.seed, out_dir)
        table = (out_dir / "summary.md").read_text()
        seconds = summary["total_seconds"]
    else:
        seeds = list(dict.fromkeys(args.seeds))
        summary, table = seed_summary({s: run_seed(plan, s, out_dir / f"seed_{s}") for s in seeds})
        save_json(out_dir / "summary.json", summary)
        (out_dir / "summary.md").write_text(table)
        seconds = sum(summary["seed_seconds"].values())
    print("\n" + table)
    draw_figures(out_dir, plan, args.seed if args.seeds is None else args.seeds[0])
    print(f"total stage time {seconds:.0f} s; summary in {out_dir / 'summary.md'}")


if __name__ == "__main__":
    run_cli(main, get_parser())
