"""The files one program writes and another reads, each defined once: its name, its fields and
how it is read back. The writer and every reader go through these classes, so a field cannot be
spelled one way by the writer and another by a reader.

    results.json   Results: any stage's outcome (training stages name their encoder file;
                   stage 3 adds ACC, ASR and its per-epoch curve)
    mi.json        MIRecord: MIMIC's MI per block, the estimator's history and verdicts, weights
    summary.json   Summary: one seed of run_pipeline.py (rows keyed by method id);
                   SeedsSummary: the summary over seeds, in the folder above the seed_<s>/ folders
    log.jsonl      one JSON object per epoch: utils.logs.RunLog writes it, read_log reads it
"""
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError
from .files import save_json

RESULTS = "results.json"
MI = "mi.json"
SUMMARY = "summary.json"
LOG = "log.jsonl"
LAYOUT = "layout.json"
DETECTED_TRIGGER = "trigger.npz"    # a detection stage's best trigger: mask (HxW in [0, 1]), pattern (HxWx3, 0-255)
DETECTED_TRIGGER_IMAGE = "trigger.png"  # the same drawn: mask, pattern, mask x pattern side by side      # a seed folder's stage-3 folders per figure (pipeline.plan.Plan.layout)
METRICS = ("acc", "asr", "asr_excluding_target")     # stage 3's numbers, in percent


def _read(path):
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


class _Record:
    """A dataclass stored as one JSON object. Fields left at None are not written; a reader gets
    them back as None. Keys the class does not define go to `extra` where the class has one (and
    are written back at the top level); missing required keys are an error that names the file."""

    @classmethod
    def from_dict(cls, data, path="<dict>"):
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; it was not written by this version of the "
                            f"stage (run the stage again)")
        values = {k: v for k, v in data.items() if k in known and k != "extra"}
        if "extra" in known:
            values["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**values)

    @classmethod
    def load(cls, path):
        return cls.from_dict(_read(path), path)

    def to_dict(self):
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        return {**data, **getattr(self, "extra", {})}

    def save(self, path):
        save_json(path, self.to_dict())


@dataclass
class Results(_Record):
    """results.json of a stage. Training stages name their final model file `encoder`, relative to
    the folder (a copied folder names its own); stage 3 names the evaluated encoder's full path
    there and fills the metrics, `trigger` (the description of the trigger its ASR used,
    datasets.trigger) and `curve` (its per-epoch rows). `fingerprint` says which run made the file
    (utils.fingerprint)."""
    stage: str
    args: dict
    epochs: int = 0
    encoder: str = ""
    final: dict = None
    extra: dict = field(default_factory=dict)
    acc: float = None
    asr: float = None
    asr_excluding_target: float = None
    dataset: str = None
    target_label: int = None
    trigger: dict = None
    curve: list = None
    fingerprint: dict = None            # utils.fingerprint: the stage, its flags, its inputs' hashes

    def metrics(self):
        return {m: getattr(self, m) for m in METRICS}

    def encoder_file(self, folder):
        """The encoder a training stage wrote, as a full path."""
        return Path(folder) / self.encoder


@dataclass
class MIRecord(_Record):
    """mi.json of a MIMIC run. Lists run over `blocks`; `convergence` holds one report of
    models.mine.convergence per block (None when nothing was estimated, e.g. uniform weights)."""
    blocks: list
    mi: list
    weights: list
    mi_model: str = "teacher"
    history: list = field(default_factory=list)
    convergence: list = None

    def verdicts(self):
        """Per block the estimator's verdict ("converged", "rising", ...), None when not recorded."""
        if not self.convergence:
            return [None] * len(self.blocks)
        return [report.get("reason") for report in self.convergence]

    def per_block(self):
        """{block: {"mi", "weight", "convergence"}} for the summary."""
        return {block: {"mi": value, "weight": weight, "convergence": verdict}
                for block, value, weight, verdict in zip(self.blocks, self.mi, self.weights, self.verdicts())}


@dataclass
class Summary(_Record):
    """summary.json of one seed of run_pipeline.py. `results`: {task: {method id: {metric: value}}};
    `mi`: {task: MIRecord.per_block()}; `backdoor_left`: {task: {method id: bool}}, whether a
    defence left the backdoor in place (pipeline.summary.BACKDOOR_LEFT); `checks`:
    [{"check", "passed"}] of the demo; `stage_seconds`: wall time of each stage run this time;
    `attacks`: {task: {"attack": attack id, "task": the task's own key}} (methods.attacks();
    a task it lacks is BadEncoder's); `asr_matrix`: {attack on task: {method id: spread of ASR}}."""
    preset: str
    seed: int
    results: dict
    mi: dict = field(default_factory=dict)
    mi_not_converged: list = field(default_factory=list)
    backdoor_left: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    checks: list = None
    attacks: dict = field(default_factory=dict)
    asr_matrix: dict = field(default_factory=dict)
    detection: dict = None              # --detect: {detector: {table: {encoder: {score, verdict, seconds}}}}


@dataclass
class SeedsSummary(_Record):
    """summary.json over seeds: `stats` {task: {method id: {metric: spread}}} (report.stats),
    MIMIC's `paired_differences`, per-seed MI and checks, times, and the attacks x defences
    `asr_matrix` over seeds (as in Summary)."""
    preset: str
    seeds: list
    stats: dict
    paired_differences: dict = field(default_factory=dict)
    mi: dict = field(default_factory=dict)
    mi_not_converged: list = field(default_factory=list)
    backdoor_left: dict = field(default_factory=dict)
    seed_seconds: dict = field(default_factory=dict)
    wall_seconds: float = None
    checks: dict = None
    attacks: dict = field(default_factory=dict)
    asr_matrix: dict = field(default_factory=dict)
    detection: dict = None              # {detector: {table: {encoder: {"score": spread, "flagged", "seeds"}}}}


def read_log(path):
    """The rows of a log.jsonl; a line cut short by a kill (the last one) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
