"""What each seed runs, as jobs: stage 0, then per attack and task the backdoored encoder, the
students and defences trained from it, and one evaluation per encoder. Folders, per seed folder:

    clean/                       stage 0, shared by every attack (absent with a shipped clean encoder)
    no_teacher/                  the no-teacher control, shared by every attack and task
    badencoder_<task>/           stage 1 (BadEncoder)
    <method>_<task>/             MIMIC, its controls and the baseline defences (method ids of report.methods)
    eval/<method>_<task>/        stage 3 of each encoder, clean and backdoored included
    ctrl_<task>/                 CTRL: stage 0 on the poisoned copy of the pre-training data
    <method>_ctrl_<task>/        the defences of the CTRL encoder
    eval/<method>_ctrl_<task>/   stage 3 with CTRL's trigger; <task> is the pre-training dataset

With --ratios (the clean-data fraction sweep) every defence and control runs once per fraction r,
its folders named <method>_r<r>_<task> (no_teacher_r<r>, eval/<method>_r<r>_<task>), against the
same clean and backdoored encoders, which are trained and evaluated once.
"""
import contextlib
import io
import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from paper import TRIGGER
from report.methods import BADENCODER, BASELINES, CTRL, DEFENSES, MIMIC, NO_TEACHER, UNIFORM, table_key
from utils.errors import UserError

from .runner import Job, stage_module

# MIMIC.py's extra flags for MIMIC and its controls. The no-teacher control has attention transfer
# and cloning switched off, so only InfoNCE trains it: its teacher's values never reach it (a test
# checks the student is bit for bit the same with another teacher). The runner gives it the clean
# encoder as teacher, so it runs beside stage 1 and one student serves every attack and task.
STUDENT_FLAGS = {
    MIMIC: [],
    NO_TEACHER: ["--attention", "uniform", "--mi_scale", "0", "--at_base_layer1", "0", "--at_base_layer2", "0",
                   "--at_base_layer3", "0", "--at_base_layer4", "0", "--clone_weight", "0"],
    UNIFORM: ["--attention", "uniform"],
}
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


# The stage scripts, by the name of their --<stage>_args flag (CTRL's stage 0 is a clean job too).
STAGE_SCRIPTS = {"clean": "train_clean_encoder.py", "badencoder": "train_badencoder.py", "mimic": "MIMIC.py",
                 "defense": "defenses.py", "downstream": "training_downstream_classifier.py"}
STAGE_ARGS = tuple(STAGE_SCRIPTS)
SUBSET_STAGES = ("mimic", "defense")        # the stages that read the clean subset, whose --ratio --ratios sets


@dataclass
class Plan:
    """Everything that decides a seed's numbers: the data, each stage's flags, which students and
    defences. `methods`: MIMIC and the defences asked for (method ids); `extra`: --<stage>_args;
    `attacks`: attack ids (report.methods.ATTACKS); `ctrl_task`: CTRL's task (the pre-training
    dataset itself and its target class, reference None) and `ctrl_data`: the poisoned copy's name;
    `ratios`: the fractions of the sweep, each defence and control run at each (None: once, at the
    --ratio of the preset's flags)."""
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
    attacks: list = field(default_factory=lambda: [BADENCODER])
    ctrl_task: object = None
    ctrl_data: str = None
    clean_encoder: str = None           # a shipped stage-0 encoder used instead of training one
    ratios: list = None                 # --ratios: clean-data fractions of the sweep (None: the preset's alone)
    sweep_budget: str = "steps"         # --sweep_budget: what a swept student keeps from the preset's run
    images: int = None                  # the pre-training images, which the fractions share (check_ratios)

    def config(self):
        """The plan as JSON would return it (compared with a summary's)."""
        return json.loads(json.dumps(asdict(self), default=str))

    def students(self):
        """The MIMIC.py runs of each task: MIMIC if asked for, the controls unless --no_controls."""
        return [m for m in STUDENT_FLAGS if (m in self.methods if m == MIMIC else self.controls)]

    def defenses(self):
        return [m for m in self.methods if m in DEFENSES]

    def attack_tasks(self):
        """(attack, task) of every table, in order: BadEncoder on each task, then CTRL on its own."""
        pairs = [(BADENCODER, t) for t in self.tasks] if BADENCODER in self.attacks else []
        return pairs + ([(CTRL, self.ctrl_task)] if CTRL in self.attacks else [])

    def swept(self, ratio):
        """Whether a job's fraction is one the preset's flags do not give (None or Preset.ratio: they
        do), so that its folder names the fraction and its command sets it."""
        return ratio is not None and ratio != self.preset.ratio

    def ratio_tag(self, ratio):
        """The part of a defence's or control's folder name that gives its fraction: "" for the
        preset's own (so a sweep reuses the folders of a run without --ratios), else _r<ratio>
        (e.g. mimic_r0.01_demo_downstream)."""
        return f"_r{ratio:g}" if self.swept(ratio) else ""

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
        flags, batch = self.ratio_flags(ratio), self.preset.global_batch["mimic"]
        own_steps = int((self.preset.ratio or 0) * self.images) // batch if flags else 0
        if not own_steps or self.sweep_budget != "steps":     # no steps of the preset's own to keep
            return flags
        epochs = flag_value([*self.preset.mimic, *self.extra["mimic"]], "--epochs")
        if epochs is None:
            epochs = stage_module(STAGE_SCRIPTS["mimic"]).get_parser().get_default("epochs")
        return [*flags, "--epochs", str(math.ceil(int(epochs) * own_steps / (int(ratio * self.images) // batch)))]

    def fractions(self):
        """The clean-data fractions the defences and controls run at: each of --ratios, or [None]
        (once, at the preset's --ratio, in folders that do not name it)."""
        return list(self.ratios) if self.ratios else [None]

    def encoder_folders(self, attack, task, ratio=None):
        """{method id: stage folder} of every encoder evaluated for an attack on a task (the defences'
        and controls' at clean-data fraction `ratio`, fractions())."""
        suffix = task.dataset if attack == BADENCODER else f"{attack}_{task.dataset}"
        folders = {"clean": "clean", "backdoored": f"{attack}_{task.dataset}"}
        tag = self.ratio_tag(ratio)
        folders.update({m: f"{m}{tag}" if m == NO_TEACHER else f"{m}{tag}_{suffix}"
                        for m in (*self.students(), *self.defenses())})
        return folders

    def eval_folder(self, attack, task, method, ratio=None):
        suffix = task.dataset if attack == BADENCODER else f"{attack}_{task.dataset}"
        return f"eval/{method}{'' if method in BASELINES else self.ratio_tag(ratio)}_{suffix}"

    def tables(self):
        """{summary table key: (attack, task, ratio)}, one per attack, task and fraction; the key is
        report.methods.table_key's."""
        return {table_key(a, t.key, r): (a, t, r) for a, t in self.attack_tasks() for r in self.fractions()}

    def check_ratios(self, images):
        """Before any work: with --ratios, no --<stage>_args of a clean-subset stage may set --ratio
        (the sweep sets it), and each fraction of the `images` pre-training images must hold one
        batch of those stages (incomplete batches are dropped)."""
        self.images = images
        if not self.ratios:
            return
        for stage in SUBSET_STAGES:
            if flag_value(self.extra[stage], "--ratio") is not None:
                raise UserError(f"--{stage}_args sets --ratio, which --ratios sets for every {stage} job; "
                                f"drop it from --{stage}_args")
        for stage in SUBSET_STAGES:
            batch = self.preset.global_batch[stage]
            small = [r for r in self.ratios if int(r * images) < batch]
            if small:
                raise UserError(f"--ratios {','.join(f'{r:g}' for r in small)}: {int(small[0] * images)} of the "
                                f"{images} images of {self.pretraining} hold less than one {stage} batch of {batch}; "
                                f"choose fractions of at least {batch / images:.3g}")

    def batch(self, stage):
        """--batch_size for one process of a stage: the preset's global batch shared among nproc."""
        batch = self.preset.global_batch[stage]
        if batch % self.nproc:
            raise UserError(f"the {stage} stage's global batch of {batch} does not split among "
                            f"--nproc_per_node {self.nproc} processes; choose a divisor of {batch}")
        return ["--batch_size", str(batch // self.nproc)]


def seed_jobs(plan, seed, out_dir, key=""):
    """The jobs of one seed into out_dir; job keys start with `key` (e.g. "seed_1/")."""
    common = ["--data_dir", plan.data_dir, "--device", plan.device, "--seed", str(seed),
              *(["--protocol", plan.protocol] if plan.protocol != "ours" else [])]
    p, x = plan.preset, plan.extra

    def job(name, script, folder, args, deps=(), training=True, inputs=()):
        return Job(f"{key}{folder}", f"{name}, seed {seed}", script, out_dir / folder,
                   lambda done: [*args(done), *common], tuple(f"{key}{d}" for d in deps), training, inputs)

    def encoder(folder):
        if folder == "clean" and plan.clean_encoder:
            return lambda done: plan.clean_encoder
        return lambda done: done[f"{key}{folder}"].encoder

    clean = [] if plan.clean_encoder else ["clean"]         # the clean encoder's job, if it is trained
    jobs = [] if plan.clean_encoder else [job(
        "stage 0: clean encoder", STAGE_SCRIPTS["clean"], "clean",
        lambda done: ["--pretraining_dataset", plan.pretraining, *p.clean, *plan.batch("clean"), *x["clean"]])]
    for ratio in plan.fractions() if NO_TEACHER in plan.students() else []:
        at = "" if ratio is None else f" (fraction {ratio:g})"
        jobs.append(job(f"stage 2: {NO_TEACHER}{at}", STAGE_SCRIPTS["mimic"], NO_TEACHER + plan.ratio_tag(ratio),
                        lambda done, r=ratio: [
                            "--pretraining_dataset", plan.pretraining, "--teacher", encoder("clean")(done),
                            *p.mimic, *plan.batch("mimic"), *x["mimic"], *STUDENT_FLAGS[NO_TEACHER],
                            *plan.student_flags(r)],
                        deps=clean))
    for attack, task in plan.attack_tasks():
        name = task.dataset
        bad = plan.encoder_folders(attack, task)["backdoored"]
        what = f"{name}" if attack == BADENCODER else f"{attack}, {name}"
        if attack == BADENCODER:
            jobs.append(job(f"stage 1: BadEncoder ({name})", STAGE_SCRIPTS["badencoder"], bad,
                            lambda done, t=task: [
                "--pretraining_dataset", plan.pretraining, "--downstreamTask", t.dataset, "--trigger_file", TRIGGER,
                "--reference_file", t.reference, "--pretrained_encoder", encoder("clean")(done),
                *p.badencoder, *plan.batch("badencoder"), *x["badencoder"]], deps=clean))
            trigger, reference = ["--trigger_file", TRIGGER], ["--reference_file", task.reference]
        else:
            # The poisoned copy is an input file: rewritten with other data or settings, it trains anew.
            jobs.append(job(f"stage 0 on CTRL's poisoned data ({name})", STAGE_SCRIPTS["clean"], bad,
                            lambda done: ["--pretraining_dataset", plan.ctrl_data, "--encoder_usage", plan.pretraining,
                                          *p.clean, *plan.batch("clean"), *x["clean"]],
                            inputs=(f"{plan.data_dir}/{plan.ctrl_data}/train.npz",)))
            trigger, reference = ["--trigger", CTRL], []
        for ratio in plan.fractions():
            folders = plan.encoder_folders(attack, task, ratio)
            at = what if ratio is None else f"{what}, fraction {ratio:g}"
            for method in [m for m in plan.students() if m != NO_TEACHER]:
                jobs.append(job(f"stage 2: {method} ({at})", STAGE_SCRIPTS["mimic"], folders[method],
                                lambda done, m=method, b=bad, r=ratio: [
                                    "--pretraining_dataset", plan.pretraining, "--teacher", encoder(b)(done),
                                    *p.mimic, *plan.batch("mimic"), *x["mimic"], *STUDENT_FLAGS[m],
                                    *plan.student_flags(r)],
                                deps=[bad]))
            for method in plan.defenses():
                def defense_args(done, m=method, b=bad, r=ratio):
                    return ["--defense", m, "--suspect", encoder(b)(done), "--pretraining_dataset", plan.pretraining,
                            *p.defenses[m], *plan.batch("defense"), *x["defense"], *plan.ratio_flags(r)]
                jobs.append(job(f"stage 2: {method} ({at})", STAGE_SCRIPTS["defense"], folders[method], defense_args,
                                deps=[bad]))
            for method, folder in folders.items():
                if method in BASELINES and ratio != plan.fractions()[0]:
                    continue                # the clean and backdoored encoders are evaluated once
                jobs.append(job(f"stage 3: {method} on {at if method not in BASELINES else what}",
                                STAGE_SCRIPTS["downstream"], plan.eval_folder(attack, task, method, ratio),
                                lambda done, f=folder, t=task, tr=trigger, r=reference: [
                                    "--dataset", t.dataset, "--reference_label", t.label, *tr,
                                    "--encoder", encoder(f)(done), *r, *p.downstream, *x["downstream"]],
                                deps=[folder] if folder != "clean" else clean, training=False))
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
    stage_of = {script: stage for stage, script in STAGE_SCRIPTS.items()}
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
