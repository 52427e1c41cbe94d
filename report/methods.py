"""The rows of every results table, by method id, and how each is shown.

Summaries, statistics and figures key their rows by these ids; LABELS turns an id into the text
a table or a figure shows, and nothing else does.
"""
# The encoders every task evaluates, in table order: the two the attack makes, MIMIC and its two
# controls (MIMIC.py with uniform weights, and with the teacher's terms off), the baseline defences
# of defenses.py.
BASELINES = ("clean", "backdoored")
MIMIC = "mimic"
CONTROLS = ("no_teacher", "uniform")
DEFENSES = ("finetune", "fine_pruning", "nad")
ROWS = (*BASELINES, MIMIC, *CONTROLS, *DEFENSES)

LABELS = {"clean": "clean", "backdoored": "backdoored", "mimic": "MIMIC", "no_teacher": "no-teacher control",
          "uniform": "uniform-weights control", "finetune": "FT", "fine_pruning": "FP", "nad": "NAD"}


def label(method):
    """The shown name of a method id (an unknown id is shown as it is)."""
    return LABELS.get(method, method)
