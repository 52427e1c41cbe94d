"""What each seed runs, as jobs: stage 0, then per task BadEncoder, the students and defences
trained from it, and one evaluation per encoder. Folders, per seed folder:

    clean/                     stage 0
    badencoder_<task>/         stage 1
    <method>_<task>/           MIMIC, its controls and the baseline defences (method ids of report.methods)
    eval/<method>_<task>/      stage 3 of each encoder, clean and backdoored included
"""
import json
from dataclasses import asdict, dataclass

from paper import TRIGGER
from report.methods import DEFENSES, MIMIC
from utils.errors import UserError

from .runner import Job

# MIMIC.py's extra flags for MIMIC and its controls. The no-teacher control has attention transfer
# and cloning switched off, so only InfoNCE trains it.
STUDENT_FLAGS = {
    MIMIC: [],
    "no_teacher": ["--attention", "uniform", "--mi_scale", "0", "--at_base_layer1", "0", "--at_base_layer2", "0",
                   "--at_base_layer3", "0", "--at_base_layer4", "0", "--clone_weight", "0"],
    "uniform": ["--attention", "uniform"],
}
STAGE_ARGS = ("clean", "badencoder", "mimic", "defense", "downstream")     # the --<stage>_args flags


@dataclass
class Plan:
    """Everything that decides a seed's numbers: the data, each stage's flags, which students and
    defences. `methods`: MIMIC and the defences asked for (method ids); `extra`: --<stage>_args."""
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

    def config(self):
        """The plan as JSON would return it (compared with a summary's)."""
        return json.loads(json.dumps(asdict(self), default=str))

    def students(self):
        """The MIMIC.py runs of each task: MIMIC if asked for, the controls unless --no_controls."""
        return [m for m in STUDENT_FLAGS if (m in self.methods if m == MIMIC else self.controls)]

    def defenses(self):
        return [m for m in self.methods if m in DEFENSES]

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

    def job(name, script, folder, args, deps=(), training=True):
        return Job(f"{key}{folder}", f"{name}, seed {seed}", script, out_dir / folder,
                   lambda done: [*args(done), *common], tuple(f"{key}{d}" for d in deps), training)

    def encoder(folder):
        return lambda done: done[f"{key}{folder}"].encoder

    jobs = [job("stage 0: clean encoder", "train_clean_encoder.py", "clean",
                lambda done: ["--pretraining_dataset", plan.pretraining, *p.clean, *plan.batch("clean"), *x["clean"]])]
    for task in plan.tasks:
        name, bad = task.dataset, f"badencoder_{task.dataset}"
        jobs.append(job(f"stage 1: BadEncoder ({name})", "train_badencoder.py", bad, lambda done, t=task: [
            "--pretraining_dataset", plan.pretraining, "--downstreamTask", t.dataset, "--trigger_file", TRIGGER,
            "--reference_file", t.reference, "--pretrained_encoder", encoder("clean")(done),
            *p.badencoder, *plan.batch("badencoder"), *x["badencoder"]], deps=["clean"]))
        encoders = {"clean": "clean", "backdoored": bad}
        for method in plan.students():
            folder = encoders[method] = f"{method}_{name}"
            jobs.append(job(f"stage 2: {method} ({name})", "MIMIC.py", folder, lambda done, m=method, b=bad: [
                "--pretraining_dataset", plan.pretraining, "--teacher", encoder(b)(done),
                *p.mimic, *plan.batch("mimic"), *x["mimic"], *STUDENT_FLAGS[m]], deps=[bad]))
        for method in plan.defenses():
            folder = encoders[method] = f"{method}_{name}"
            jobs.append(job(f"stage 2: {method} ({name})", "defenses.py", folder, lambda done, m=method, b=bad: [
                "--defense", m, "--suspect", encoder(b)(done), "--pretraining_dataset", plan.pretraining,
                *p.defenses[m], *plan.batch("defense"), *x["defense"]], deps=[bad]))
        for method, folder in encoders.items():
            jobs.append(job(f"stage 3: {method} on {name}", "training_downstream_classifier.py",
                            f"eval/{method}_{name}", lambda done, f=folder, t=task: [
                                "--dataset", t.dataset, "--reference_label", t.label, "--trigger_file", TRIGGER,
                                "--encoder", encoder(f)(done), "--reference_file", t.reference,
                                *p.downstream, *x["downstream"]], deps=[folder], training=False))
    return jobs

