"""What each seed runs, as jobs: stage 0, then per attack and task the backdoored encoder, the
defences and controls run on it, and one evaluation per encoder. The attacks and defences, their
commands and their folders are the registry's (methods/; the folder layout is in
methods/registry.py); a plan only puts them together. Per seed folder:

    clean/                       stage 0, shared by every attack (absent with a shipped clean encoder)
    <attack>_<task>/             each attack's backdoored encoder, on each of its tasks
    <defence>_<suffix>/          each defence and control of it, by method id
    eval/<encoder>_<suffix>/     stage 3 of each encoder, clean and backdoored included

With --ratios (the clean-data fraction sweep) every defence and control runs once per fraction r,
its folders tagged _r<r> (e.g. mimic_r0.01_demo_downstream), against the same clean and
backdoored encoders, which are trained and evaluated once.
"""
import contextlib
import io
import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import methods
from methods import BASELINES
from utils.errors import UserError

from .runner import Job, stage_module


def flag_value(flags, name):
    """The value a list of command-line flags gives `name`, spelled `name V` or `name=V`, the last
    one winning as in argparse; None when the list does not set it."""
    value = None
    for i, token in enumerate(flags):
        if token == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif token.startswith(f"{name}="):
            value = token.split("=", 1)[1]
    return value


CLEAN_SCRIPT = "train_clean_encoder.py"                   # stage 0
DOWNSTREAM_SCRIPT = "training_downstream_classifier.py"   # stage 3
STUDENT_STAGE = "mimic"                 # the stage whose --epochs the steps budget of the sweep scales


def stage_scripts():
    """The stage scripts, by the name of their --<stage>_args flag: stage 0 and stage 3, and each
    method registered so far (methods.stages(); CTRL's stage 0 is a clean job too)."""
    return {"clean": CLEAN_SCRIPT, **methods.stages(), "downstream": DOWNSTREAM_SCRIPT}


@dataclass
class Plan:
    """Everything that decides a seed's numbers: the data, each stage's flags, which attacks,
    defences and controls. `methods`: the defence ids asked for (--defenses); `extra`:
    --<stage>_args; `attacks`: attack ids (methods.attacks()); `options`: run_pipeline.py's flags
    of the methods themselves (e.g. ctrl_target); `prepared`: what each attack's prepare() made
    (e.g. CTRL's poisoned copy's name); `ratios`: the fractions of the sweep, each defence and
    control run at each (None: once, at the --ratio of the preset's flags)."""
    preset_name: str
    preset: object
    pretraining: str
    tasks: list
    methods: list
    controls: bool
    extra: dict
    nproc: int
    data_dir: str
    device: str
    protocol: str
    demo_checks: bool
    attacks: list = field(default_factory=lambda: [methods.first_attack()])
    options: dict = field(default_factory=dict)
    prepared: dict = field(default_factory=dict)
    clean_encoder: str = None           # a shipped stage-0 encoder used instead of training one
    ratios: list = None                 # --ratios: clean-data fractions of the sweep (None: the preset's alone)
    sweep_budget: str = "steps"         # --sweep_budget: what a swept student keeps from the preset's run
    detectors: list = field(default_factory=list)   # --detect: detection defences run on every encoder
    reference_dir: str = "reference"    # --reference_dir: where reference files the run makes go
    images: int = None                  # the pre-training images, which the fractions share (check_ratios)

    def config(self):
        """The plan as JSON would return it, with the flags and batch each method of the run gets
        under the preset (its module's), as summary.json records it."""
        own = {m.id: {"flags": m.preset_flags(self), "batch": m.global_batch(self)}
               for m in [*(methods.get(a) for a in self.attacks), *(methods.get(d) for d in self.defences()),
                         *(methods.get(d) for d in self.detectors)]}
        return json.loads(json.dumps({**asdict(self), "method_flags": own}, default=str))

    @property
    def data_path(self):
        return Path(self.data_dir)

    def defences(self):
        """The defence and control ids of every table, in the registry's order: those asked for by
        --defenses, and the controls unless --no_controls."""
        return [i for i, d in methods.defences().items() if (self.controls if d.control else i in self.methods)]

    def attack_tasks(self):
        """(attack id, task) of every table, in the registry's order of the attacks."""
        return [(a, t) for a, attack in methods.attacks().items() if a in self.attacks for t in attack.tasks(self)]

    def swept(self, ratio):
        """Whether a job's fraction is one the preset's flags do not give (None or Preset.ratio: they
        do), so that its folder names the fraction and its command sets it."""
        return ratio is not None and ratio != self.preset.ratio

    def ratio_tag(self, ratio):
        """The part of a defence's or control's folder name that gives its fraction: "" for the
        preset's own (so a sweep reuses the folders of a run without --ratios), else _r<ratio>
        (e.g. mimic_r0.01_demo_downstream)."""
        return methods.registry.ratio_tag(self.swept(ratio), ratio)

    def ratio_flags(self, ratio):
        """The flags that set a job's clean-data fraction: none for the preset's own (its flags give
        it, and the command stays that of a run without --ratios), else --ratio, after the preset's
        flags and --<stage>_args (which may not set it, check_ratios)."""
        return ["--ratio", f"{ratio:g}"] if self.swept(ratio) else []

    def student_flags(self, ratio):
        """ratio_flags(), and under the steps budget the --epochs that give a student at this
        fraction the optimiser steps of the preset's student at its own: epochs x (its subset's steps
        per epoch) / (this subset's), rounded up. The preset's epochs are the last --epochs of its
        mimic flags and --mimic_args (MIMIC.py's default without one). Where the preset's own
        fraction of these images holds no batch there are no steps to keep, and the epochs stay."""
        flags, batch = self.ratio_flags(ratio), self.preset.global_batch[STUDENT_STAGE]
        own_steps = int((self.preset.ratio or 0) * self.images) // batch if flags else 0
        if not own_steps or self.sweep_budget != "steps":     # no steps of the preset's own to keep
            return flags
        epochs = flag_value([*self.preset.mimic, *self.extra[STUDENT_STAGE]], "--epochs")
        if epochs is None:
            epochs = stage_module(stage_scripts()[STUDENT_STAGE]).get_parser().get_default("epochs")
        return [*flags, "--epochs", str(math.ceil(int(epochs) * own_steps / (int(ratio * self.images) // batch)))]

    def fractions(self):
        """The clean-data fractions the defences and controls run at: each of --ratios, or [None]
        (once, at the preset's --ratio, in folders that do not name it)."""
        return list(self.ratios) if self.ratios else [None]

    def encoder_folders(self, attack, task, ratio=None):
        """{row id: stage folder} of every encoder evaluated for an attack on a task (the defences'
        and controls' at clean-data fraction `ratio`, fractions())."""
        return methods.encoder_folders(attack, task, self.defences(), self.ratio_tag(ratio))

    def eval_folder(self, attack, task, row, ratio=None):
        """Stage 3's folder of one encoder of an attack's table. An encoder that an earlier attack's
        table on the task holds too (the clean encoder, the no-teacher control), evaluated with
        the same trigger and reference, is evaluated once, in that attack's folder."""
        folder, this = self.encoder_folders(attack, task, ratio)[row], methods.get(attack)
        for first in (a for a, t in self.attack_tasks() if t == task):
            if first == attack:
                break
            other = methods.get(first)
            if (self.encoder_folders(first, task, ratio).get(row) == folder
                    and other.trigger_flags(task) == this.trigger_flags(task)
                    and other.reference_flags(task) == this.reference_flags(task)):
                return methods.eval_folder(first, task, row, self.ratio_tag(ratio))
        return methods.eval_folder(attack, task, row, self.ratio_tag(ratio))

    def tables(self):
        """{summary table key: (attack, task, ratio)}, one per attack, task and fraction; the key is
        methods.table_key's."""
        return {methods.table_key(a, t.key, r): (a, t, r) for a, t in self.attack_tasks() for r in self.fractions()}

    def detections(self):
        """{detector id: {table key: {row id: its detect folder}}}: which detection folder examines
        each encoder of each table (an encoder in several tables is examined once)."""
        return {d: {key: {row: methods.detect_folder(d, folder)
                          for row, folder in self.encoder_folders(a, t, r).items()}
                    for key, (a, t, r) in self.tables().items()} for d in self.detectors}

    def layout(self):
        """What report.figures reads from a seed folder (layout.json): "eval": {figure group: {row
        name: eval folder}}, which stage-3 folders each task's downstream-curve figure draws;
        "detect": detections(); "triggers": {table key: the attack's trigger file, or None}."""
        groups = {}
        for attack, task, ratio in self.tables().values():
            rows = groups.setdefault(methods.figure_group(attack, task), {})
            for row in self.encoder_folders(attack, task, ratio):
                name = row if row in BASELINES else f"{row}{self.ratio_tag(ratio)}"
                rows[name] = self.eval_folder(attack, task, row, ratio)
        triggers = {key: flag_value(methods.get(a).trigger_flags(t), "--trigger_file")
                    for key, (a, t, r) in self.tables().items()}
        return {"eval": groups, "detect": self.detections(), "triggers": triggers}

    def subset_batches(self):
        """(stage, global batch) of every job that reads the clean subset (--ratio)."""
        found = {}
        for i in self.defences():
            d = methods.get(i)
            if d.reads_subset:
                found.setdefault(d.stage, d.global_batch(self))
        return [(s, b) for s, b in found.items() if b is not None]

    def check_ratios(self, images):
        """Before any work: with --ratios, no --<stage>_args of a clean-subset stage may set --ratio
        (the sweep sets it), and each fraction of the `images` pre-training images must hold one
        batch of those stages (incomplete batches are dropped)."""
        self.images = images
        if not self.ratios:
            return
        for stage, _ in self.subset_batches():
            if flag_value(self.extra[stage], "--ratio") is not None:
                raise UserError(f"--{stage}_args sets --ratio, which --ratios sets for every {stage} job; "
                                f"drop it from --{stage}_args")
        for stage, batch in self.subset_batches():
            small = [r for r in self.ratios if int(r * images) < batch]
            if small:
                raise UserError(f"--ratios {','.join(f'{r:g}' for r in small)}: {int(small[0] * images)} of the "
                                f"{images} images of {self.pretraining} hold less than one {stage} batch of {batch}; "
                                f"choose fractions of at least {batch / images:.3g}")

    def batch(self, stage, batch=None):
        """--batch_size for one process of a stage: its global batch (default: the preset's for
        the stage) shared among nproc."""
        batch = self.preset.global_batch[stage] if batch is None else batch
        if batch % self.nproc:
            raise UserError(f"the {stage} stage's global batch of {batch} does not split among "
                            f"--nproc_per_node {self.nproc} processes; choose a divisor of {batch}")
        return ["--batch_size", str(batch // self.nproc)]

    def check_batches(self):
        """Before any work: every job's batch splits among the processes, and every method of the
        run has flags for the preset."""
        self.batch("clean")
        for method in [*(methods.get(a) for a in self.attacks), *(methods.get(d) for d in self.defences()),
                       *(methods.get(d) for d in self.detectors)]:
            method.preset_flags(self)
            self.method_batch(method)

    def method_batch(self, method):
        """--batch_size of a method's command (none when its stage takes no batch from the runner)."""
        batch = method.global_batch(self)
        return [] if batch is None else self.batch(method.stage, batch)

    def method_args(self, method, lead, tail=()):
        """A method's command: its own leading flags, its preset's, the batch, --<stage>_args, `tail`."""
        return [*lead, *method.preset_flags(self), *self.method_batch(method), *self.extra[method.stage], *tail]


def seed_jobs(plan, seed, out_dir, key=""):
    """The jobs of one seed into out_dir; job keys start with `key` (e.g. "seed_1/")."""
    common = ["--data_dir", plan.data_dir, "--device", plan.device, "--seed", str(seed),
              *(["--protocol", plan.protocol] if plan.protocol != "ours" else [])]
    p, x = plan.preset, plan.extra
    scripts = stage_scripts()

    def job(name, script, folder, args, deps=(), training=True, inputs=()):
        return Job(f"{key}{folder}", f"{name}, seed {seed}", script, out_dir / folder,
                   lambda done: [*args(done), *common], tuple(f"{key}{d}" for d in deps), training, inputs)

    def encoder(folder):
        if folder == "clean" and plan.clean_encoder:
            return lambda done: plan.clean_encoder
        return lambda done: done[f"{key}{folder}"].encoder

    clean = [] if plan.clean_encoder else ["clean"]         # the clean encoder's job, if it is trained
    jobs = [] if plan.clean_encoder else [job(
        "stage 0: clean encoder", scripts["clean"], "clean",
        lambda done: ["--pretraining_dataset", plan.pretraining, *p.clean, *plan.batch("clean"), *x["clean"]])]
    defences = [methods.get(i) for i in plan.defences()]

    def defence_job(defence, suspect, folder, deps, ratio, what):
        return job(f"stage 2: {defence.id} ({what})" if what else f"stage 2: {defence.id}", defence.script, folder,
                   lambda done: plan.method_args(defence, defence.command(plan, encoder(suspect)(done)),
                                                 defence.tail(plan, ratio)), deps=deps)

    for ratio in plan.fractions():              # the defences trained once per seed, from the clean encoder
        for d in [d for d in defences if d.per_seed]:
            jobs.append(defence_job(d, "clean", d.id + plan.ratio_tag(ratio), clean, ratio,
                                    "" if ratio is None else f"fraction {ratio:g}"))
    evaluated = set()
    for attack_id, task in plan.attack_tasks():
        attack, name = methods.get(attack_id), task.dataset
        bad = plan.encoder_folders(attack_id, task)["backdoored"]
        what = name if not attack.named else f"{attack_id}, {name}"
        jobs.append(job(attack.job_name(task), attack.script, bad,
                        lambda done, a=attack, t=task: plan.method_args(
                            a, a.command(plan, t, encoder("clean")(done) if a.reads_clean() else None)),
                        deps=clean if attack.reads_clean() else (), inputs=attack.inputs(plan, task)))
        for ratio in plan.fractions():
            folders = plan.encoder_folders(attack_id, task, ratio)
            at = what if ratio is None else f"{what}, fraction {ratio:g}"
            for d in [d for d in defences if not d.per_seed]:
                jobs.append(defence_job(d, bad, folders[d.id], [bad], ratio, at))
            for row, folder in folders.items():
                evaluation = plan.eval_folder(attack_id, task, row, ratio)
                if (row in BASELINES and ratio != plan.fractions()[0]) or evaluation in evaluated:
                    continue                # each encoder is evaluated once with a trigger (eval_folder)
                evaluated.add(evaluation)
                jobs.append(job(f"stage 3: {row} on {at if row not in BASELINES else what}",
                                scripts["downstream"], evaluation,
                                lambda done, f=folder, a=attack, t=task: [
                                    "--dataset", t.dataset, "--reference_label", t.label, *a.trigger_flags(t),
                                    "--encoder", encoder(f)(done), *a.reference_flags(t), *p.downstream,
                                    *x["downstream"]],
                                deps=[folder] if folder != "clean" else clean, training=False))
    examined = set()
    for detector_id, tables in plan.detections().items():
        detector = methods.get(detector_id)
        for table, rows in tables.items():
            for row, folder in rows.items():
                encoder_folder = plan.encoder_folders(*plan.tables()[table])[row]
                if folder in examined:
                    continue
                examined.add(folder)
                jobs.append(job(f"detection: {detector.label} on {encoder_folder}", detector.script, folder,
                                lambda done, d=detector, f=encoder_folder: plan.method_args(
                                    d, d.command(plan, encoder(f)(done))),
                                deps=[encoder_folder] if encoder_folder != "clean" else clean, training=False))
    return jobs


class NotRun(dict):
    """Stands in for the finished jobs before any has run (job.args(NotRun())): every job's encoder
    is <its key>."""

    def __missing__(self, key):
        return SimpleNamespace(encoder=f"<{key}>")


def check_flags(plan, jobs):
    """Before any work: every job's command parses with its stage script's own parser, so a bad
    flag in a preset or a --<stage>_args stops the run at once, in one line naming where the
    flag came from, not as a stage failing after the stages before it trained."""
    stage_of = {script: stage for stage, script in stage_scripts().items()}
    for job in jobs:
        module = stage_module(job.script)
        if module is None:
            continue
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                module.get_parser().parse_args([str(a) for a in job.args(NotRun())])
        except SystemExit:
            stage = stage_of[job.script]
            last = (said.getvalue().strip().splitlines() or ["error: its flags do not parse"])[-1]
            source = (f"--{stage}_args {shlex.join(plan.extra[stage])!r}" if plan.extra[stage]
                      else f"the {plan.preset_name} preset's {stage} flags")
            raise UserError(f"{job.name} ({job.script}): {last.split('error: ', 1)[-1]}; check {source}") from None
