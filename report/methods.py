"""The rows of every results table, by method id, and how each is shown.

Summaries, statistics and figures key their rows by these ids; LABELS turns an id into the text
a table or a figure shows, and nothing else does.
"""
# The encoders every task evaluates, in table order: the two the attack makes, MIMIC and its two
# controls (MIMIC.py with uniform weights, and with the teacher's terms off), the baseline defences
# of defenses.py.
BASELINES = ("clean", "backdoored")
MIMIC = "mimic"
NO_TEACHER, UNIFORM = "no_teacher", "uniform"
CONTROLS = (NO_TEACHER, UNIFORM)
DEFENSES = ("finetune", "fine_pruning", "nad")
ROWS = (*BASELINES, MIMIC, *CONTROLS, *DEFENSES)

LABELS = {"clean": "clean", "backdoored": "backdoored", "mimic": "MIMIC", "no_teacher": "no-teacher control",
          "uniform": "uniform-weights control", "finetune": "FT", "fine_pruning": "FP", "nad": "NAD"}


def label(method):
    """The shown name of a method id (an unknown id is shown as it is)."""
    return LABELS.get(method, method)

# The attacks a run can evaluate the defences against, in table order: BadEncoder fine-tunes the
# clean encoder with a patch trigger (stage 1); CTRL poisons the pre-training data with a
# frequency-domain trigger and trains stage 0 on it (docs/ctrl.md).
BADENCODER = "badencoder"
CTRL = "ctrl"
ATTACKS = (BADENCODER, CTRL)
ATTACK_LABELS = {BADENCODER: "BadEncoder", CTRL: "CTRL"}


def attack_label(attack):
    """The shown name of an attack id."""
    return ATTACK_LABELS.get(attack, attack)


def fraction_text(ratio):
    """How a clean-data fraction of the sweep (run_pipeline.py --ratios) is shown: '4% clean data'."""
    return f"{100 * ratio:g}% clean data"


def table_key(attack, task_key, ratio=None):
    """The key of an attack's table on a task in summaries: the task's own key for BadEncoder (as
    before attacks were a choice), prefixed by the attack's label for the others; with a fraction
    of the sweep, followed by it."""
    key = task_key if attack == BADENCODER else f"{attack_label(attack)}: {task_key}"
    return key if ratio is None else f"{key}, {fraction_text(ratio)}"


def matrix_row(attack, task_key, ratio=None):
    """The row of the attacks x defences table for an attack on a task (at a fraction of the sweep)."""
    return f"{attack_label(attack)} on {task_key}" + ("" if ratio is None else f", {fraction_text(ratio)}")
