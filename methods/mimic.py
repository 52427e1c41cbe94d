"""MIMIC (the paper) and its two controls: a fresh student distilled from the suspect encoder by
MIMIC.py. The controls are MIMIC.py with uniform attention weights (no MI), and a student trained
with the contrastive loss alone (no teacher)."""
from dataclasses import dataclass

from .registry import Defence, register


@dataclass(frozen=True, kw_only=True, eq=False)
class Student(Defence):
    """A MIMIC.py run: every student of a preset shares the preset's mimic flags and batch
    (pipeline.presets), and adds `student` flags of its own."""
    student: tuple = ()

    def preset_flags(self, plan):
        return list(plan.preset.mimic)

    def global_batch(self, plan):
        return plan.preset.global_batch["mimic"]

    def command(self, plan, suspect):
        return ["--pretraining_dataset", plan.pretraining, "--teacher", suspect]

    def tail(self, plan, ratio):
        return [*self.student, *plan.student_flags(ratio)]


_STUDENT = dict(stage="mimic", script="MIMIC.py", terms={
    "nce": "InfoNCE (contrastive)", "at": "attention transfer (weighted)", "clone": "feature clone"})

MIMIC, NO_TEACHER, UNIFORM = "mimic", "no_teacher", "uniform"      # their ids, which the demo's checks read

register(Student(id=MIMIC, label="MIMIC", doc="the paper's defence (MIMIC.py)", **_STUDENT))
# The no-teacher control has attention transfer and cloning switched off, so only InfoNCE trains it:
# its teacher's values never reach it (a test checks the student is bit for bit the same with
# another teacher). The runner gives it the clean encoder as teacher, so it runs beside stage 1 and
# one student serves every attack and task.
register(Student(
    id=NO_TEACHER, label="no-teacher control", control=True, per_seed=True,
    student=("--attention", "uniform", "--mi_scale", "0", "--at_base_layer1", "0", "--at_base_layer2", "0",
             "--at_base_layer3", "0", "--at_base_layer4", "0", "--clone_weight", "0"),
    doc="control: MIMIC.py with the teacher's terms off, InfoNCE alone", **_STUDENT))
register(Student(
    id=UNIFORM, label="uniform-weights control", control=True, student=("--attention", "uniform"),
    doc="control: MIMIC.py with uniform attention weights instead of MI-guided ones", **_STUDENT))
