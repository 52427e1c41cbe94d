"""The registry of attacks and defences: what each method is, which stage script runs it with
which flags, where its folders go and how its rows are named.

Each method is one module of this package holding one `Attack` or `Defence` (or a few that share
a script, as the baselines share defenses.py), registered with `register()`. The runner's plan,
its data checks, the summaries, the figures and the tests read the methods from here; nothing else
asks `if attack == ...`. Adding a method is one module, its tests and a line in docs/methods.md;
a test module may register its own (tests/test_registry.py does).

The results folders of a seed are built here and nowhere else (pipeline.plan calls these):

    <attack>_<task>/                the backdoored encoder of an attack on a task
    <defence><tag>_<suffix>/        a defence or control of that encoder; <suffix> is <task> for
                                    an attack whose folders do not name it (BadEncoder's, which
                                    came first), else <attack>_<task>; <tag> is _r<fraction> for
                                    a fraction of the sweep that is not the preset's own
    <defence><tag>/                 a defence trained once per seed (the no-teacher control)
    eval/<encoder><tag>_<suffix>/   stage 3 of each encoder (clean and backdoored: no tag)
    detect/<detector>/<folder>/     a detection defence on the encoder of stage folder <folder>
"""
from dataclasses import dataclass, field

from utils.errors import UserError

ATTACK_KINDS = ("model poisoning", "data poisoning")
DEFENCE_KINDS = ("purification", "detection")
# The two rows every table starts with: the encoders an attack begins from and ends with.
BASELINES = ("clean", "backdoored")

_METHODS = {}       # id -> Attack or Defence, in registration order (the tables' order)


@dataclass(frozen=True, kw_only=True, eq=False)
class Method:
    """What every method declares. id: its name on the command line and in folders; label: its
    name in tables and figures; kind: one of ATTACK_KINDS or DEFENCE_KINDS; stage: the name of the
    run_pipeline.py flag --<stage>_args whose extra flags its commands get; script: the stage script
    that runs it; presets: {preset name: flags of its command under that preset}; batch: {preset
    name: images per step of its stage, shared among --nproc_per_node} (None: the stage takes no
    --batch_size from the runner); terms: {logged loss term: how the training-curve figure names
    it}; doc: one line for run_pipeline.py --help and docs/methods.md."""
    id: str
    label: str
    kind: str
    stage: str
    script: str
    presets: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    terms: dict = field(default_factory=dict)
    doc: str = ""

    def preset_flags(self, plan):
        """Its command's flags under the run's preset; a preset it has no entry for stops the run
        before any work, naming the module to add one to."""
        if plan.preset_name not in self.presets:
            raise UserError(f"{self.label} ({self.id}) has no flags for the {plan.preset_name} preset; add an entry "
                            f"to its presets in {type(self).__module__.replace('.', '/')}.py")
        return list(self.presets[plan.preset_name])

    def global_batch(self, plan):
        """Images per step of its stage under the run's preset (None: no --batch_size is passed)."""
        return self.batch.get(plan.preset_name) if self.batch else None

    def add_runner_args(self, parser):
        """Flags of its own on run_pipeline.py (e.g. CTRL's target class); none by default."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Attack(Method):
    """A backdoor attack: a job that turns the clean encoder (or the data) into a backdoored
    encoder, per task. named: whether its folders and table keys name it (False only for the
    attack whose folders came before attacks were a choice: BadEncoder)."""
    named: bool = True

    def tasks(self, plan):
        """The downstream tasks it attacks, each a table: the run's tasks by default."""
        return list(plan.tasks)

    def prepare(self, plan):
        """Make or check the data it needs beyond the tasks' datasets, before any stage starts;
        returns what its commands need later (kept in plan.prepared[id]); its own runner flags are
        in plan.options."""
        return None

    def reads_clean(self):
        """Whether its job starts from the clean encoder (then it waits for stage 0)."""
        return True

    def command(self, plan, task, clean_encoder):
        """The flags of its job's command before the preset's, the batch and --<stage>_args."""
        raise NotImplementedError

    def inputs(self, plan, task):
        """Extra input files of its job, whose content decides reuse (beyond its stage's own)."""
        return ()

    def trigger_flags(self, task):
        """Stage 3's flags naming its trigger."""
        raise NotImplementedError

    def reference_flags(self, task):
        """Stage 3's flags naming the task's reference file (none when there is no file)."""
        return ["--reference_file", task.reference] if task.reference else []

    def job_name(self, task):
        """How the runner names its job (the seed follows)."""
        return f"stage 1: {self.label} ({task.dataset})"

    def sample_trigger(self, images):
        """The sample figure's extra row: `images` (uint8 NxHxWx3) with its trigger, or None when
        the task's row of patched test images already shows it."""
        return None


@dataclass(frozen=True, kw_only=True, eq=False)
class Defence(Method):
    """A defence (or a control) run on every backdoored encoder. control: shown as a control,
    asked for with the controls rather than by --defenses; per_seed: trained once per seed and
    fraction from the clean encoder (its result cannot depend on the suspect), shared by every
    attack and task; reads_subset: it trains on the clean subset whose fraction --ratios sweeps."""
    kind: str = "purification"
    control: bool = False
    per_seed: bool = False
    reads_subset: bool = True

    def command(self, plan, suspect):
        """The flags of its command against the encoder `suspect`, before the preset's, the batch
        and --<stage>_args."""
        raise NotImplementedError

    def tail(self, plan, ratio):
        """The flags after --<stage>_args: those that set clean-data fraction `ratio` of the sweep
        (pipeline.plan.Plan.ratio_flags), which --<stage>_args may not override."""
        return plan.ratio_flags(ratio)


@dataclass(frozen=True, kw_only=True, eq=False)
class Detector(Defence):
    """A detection defence: it trains nothing and runs on every encoder of every table (the clean
    one, each attack's backdoored one, every defence's and control's output), once per encoder,
    and says whether the encoder looks backdoored. score: the results.json key of its score (lower
    is more suspicious, or higher: see its doc); score_label: the score's name in tables."""
    kind: str = "detection"
    reads_subset: bool = False
    score: str = "score"
    score_label: str = "score"

    def command(self, plan, encoder):
        """The flags of its command on the encoder file `encoder`."""
        raise NotImplementedError

    def tail(self, plan, ratio):
        return []

    def reading(self, results):
        """{score, verdict ("backdoored" or "clean"), seconds} of its stage's Results."""
        extra = results.extra
        return {"score": extra[self.score], "verdict": extra["verdict"], "seconds": extra.get("seconds")}


def register(method):
    """Add a method to the registry (at the end of the tables' order); returns it."""
    if not isinstance(method, (Attack, Defence)):
        raise TypeError(f"register() takes an Attack or a Defence, not {type(method).__name__}")
    kinds = ATTACK_KINDS if isinstance(method, Attack) else DEFENCE_KINDS
    if method.kind not in kinds:
        raise ValueError(f"{method.id}: kind {method.kind!r} is not one of {kinds}")
    if method.id in _METHODS or method.id in BASELINES:
        raise ValueError(f"a method {method.id!r} is registered already")
    _METHODS[method.id] = method
    return method


def unregister(method_id):
    """Remove a method (tests that register their own take it out again)."""
    _METHODS.pop(method_id, None)


def attacks():
    """{id: Attack} in table order."""
    return {i: m for i, m in _METHODS.items() if isinstance(m, Attack)}


def defences(controls=None):
    """{id: Defence} of the defences that make an encoder (purification), in table order;
    controls=True/False keeps only controls / non-controls."""
    return {i: m for i, m in _METHODS.items()
            if isinstance(m, Defence) and not isinstance(m, Detector) and (controls is None or m.control == controls)}


def detectors():
    """{id: Detector} in table order."""
    return {i: m for i, m in _METHODS.items() if isinstance(m, Detector)}


def get(method_id):
    """The registered method of an id (KeyError when there is none)."""
    return _METHODS[method_id]


def stages():
    """{stage name: script} of every registered method (the runner's --<stage>_args)."""
    return {m.stage: m.script for m in _METHODS.values()}


def label(method_id):
    """The shown name of an encoder's row: a method's label, or the id itself (clean, backdoored,
    and any row the registry does not know, e.g. mimic_r0.01 of a figure)."""
    method = _METHODS.get(method_id)
    return method.label if method is not None else method_id


def attack_label(attack_id):
    return label(attack_id)


def named(attack_id):
    """Whether an attack's folders and table keys name it (an unknown id: yes)."""
    method = _METHODS.get(attack_id)
    return method.named if isinstance(method, Attack) else True


def first_attack():
    """The attack a summary table without an attack entry belongs to (summaries written before
    attacks were a choice): the one whose keys do not name it."""
    return next(i for i, a in attacks().items() if not a.named)


def term_labels():
    """{logged loss term: its name in the training-curve figure}, every method's."""
    out = {}
    for method in _METHODS.values():
        out.update(method.terms)
    return out


# ---------------------------------------------------------------- names of tables and folders

def fraction_text(ratio):
    """How a clean-data fraction of the sweep (run_pipeline.py --ratios) is shown: '4% clean data'."""
    return f"{100 * ratio:g}% clean data"


def table_key(attack_id, task_key, ratio=None):
    """The key of an attack's table on a task in summaries: the task's own key for the attack
    whose keys do not name it, prefixed by the attack's label for the others; with a fraction of
    the sweep, followed by it."""
    key = task_key if not named(attack_id) else f"{attack_label(attack_id)}: {task_key}"
    return key if ratio is None else f"{key}, {fraction_text(ratio)}"


def matrix_row(attack_id, task_key, ratio=None):
    """The row of the attacks x defences table for an attack on a task (at a fraction of the sweep)."""
    return f"{attack_label(attack_id)} on {task_key}" + ("" if ratio is None else f", {fraction_text(ratio)}")


def ratio_tag(swept, ratio):
    """The part of a folder name that gives a fraction of the sweep: "" when not `swept` (the
    preset's own fraction, so a sweep reuses a plain run's folders), else _r<ratio>."""
    return f"_r{ratio:g}" if swept else ""


def folder_suffix(attack_id, task):
    """What ends the folders of an attack's encoders on a task (the module docstring)."""
    return task.dataset if not named(attack_id) else f"{attack_id}_{task.dataset}"


def encoder_folders(attack_id, task, defence_ids, tag=""):
    """{row id: stage folder} of every encoder of an attack's table: clean, backdoored, then each
    defence and control (with the fraction's tag)."""
    suffix = folder_suffix(attack_id, task)
    folders = {"clean": "clean", "backdoored": f"{attack_id}_{task.dataset}"}
    folders.update({m: f"{m}{tag}" if get(m).per_seed else f"{m}{tag}_{suffix}" for m in defence_ids})
    return folders


def eval_folder(attack_id, task, row, tag=""):
    """Stage 3's folder of one encoder of an attack's table (the clean and backdoored encoders'
    carry no fraction: they are evaluated once)."""
    return f"eval/{row}{'' if row in BASELINES else tag}_{folder_suffix(attack_id, task)}"


def detect_folder(detector_id, encoder_folder):
    """A detector's folder for one encoder of a seed (each encoder is examined once, whatever the
    tables it is in): detect/<detector>/<the encoder's stage folder>."""
    return f"detect/{detector_id}/{encoder_folder}"


def figure_group(attack_id, task):
    """The name of the downstream-curve figure of an attack's task: downstream_<this>.png."""
    return folder_suffix(attack_id, task)
