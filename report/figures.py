"""Figures of a results folder written by run_pipeline.py (one seed, or seed_* subfolders).

Each figure has a pure function that extracts the numbers (plain lists and dicts, tested against
hand-made folders) and a draw function that only lays them out and writes a PNG. plot_results()
finds what exists in a folder and draws it into <results_dir>/figures/, skipping what is absent,
so it can run on a pipeline that stopped half way.
"""
import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")   # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from methods import BASELINES, attack_label, label, term_labels  # noqa: E402
from report.stats import (METRIC_LABELS, asr_matrix, seed_count, several_attacks, summarize_seeds,  # noqa: E402
                          sweep_data)
from utils.errors import UserError  # noqa: E402
from utils.records import (DETECTED_TRIGGER, LAYOUT, LOG, MI, RESULTS, SUMMARY, MIRecord, Summary,  # noqa: E402
                           read_log)

ROOT = Path(__file__).resolve().parent.parent   # trigger files in layout.json are relative to it
DPI = 120
NOT_PLOTTED = ("epoch", "seconds")
TOTAL_LABELS = {"loss": "total loss"}    # the other logged terms are named by their methods (methods/)
GRID_ROWS = ("clean", "triggered", "reference", "view 1", "view 2")
GAIN = 8   # an attack's difference row shows 128 + 8 x (triggered - clean), so a faint trigger is visible


class NothingToPlot(ValueError):
    """The source exists but holds no numbers yet (e.g. a stage that has not finished an epoch)."""


# ---------------------------------------------------------------- reading

def read_json(source):
    """A dict passed through, or the parsed JSON file at a path."""
    return source if isinstance(source, dict) else json.loads(Path(source).read_text())


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- extraction (pure)

def bar_data(stats, task):
    """Encoders, metrics and per-metric lists of means and stds for one task of summarize_seeds()."""
    rows = stats[task]
    encoders = list(rows)
    metrics = [m for m in METRIC_LABELS if any(m in rows[e] for e in encoders)]
    nan = float("nan")     # a metric missing for one encoder leaves a gap, not a zero-height bar
    means = {m: [rows[e][m]["mean"] if m in rows[e] else nan for e in encoders] for m in metrics}
    stds = {m: [rows[e][m]["std"] if m in rows[e] else 0.0 for e in encoders] for m in metrics}
    seeds = seed_count(c for r in rows.values() for c in r.values())
    return {"encoders": [label(e) for e in encoders], "metrics": metrics, "means": means, "stds": stds, "seeds": seeds}


def log_series(rows, skip=NOT_PLOTTED):
    """{column: {"epoch": [...], "value": [...]}} for every numeric column except `skip`.

    A column present on some rows only (kNN accuracy is measured every --knn_freq epochs) gets
    exactly the epochs where it was logged.
    """
    series = {}
    for i, row in enumerate(rows):
        epoch = row.get("epoch", i + 1)
        for name, value in row.items():
            if name not in skip and _is_number(value):
                column = series.setdefault(name, {"epoch": [], "value": []})
                column["epoch"].append(epoch)
                column["value"].append(value)
    return series


def mi_data(mi):
    """Blocks, MI (nats), attention weights and each block's converged flag (None when not
    recorded) of an mi.json, read through its one definition (utils.records.MIRecord)."""
    record = mi if isinstance(mi, MIRecord) else MIRecord.from_dict(read_json(mi))
    verdicts = record.verdicts()
    reports = record.convergence or [{}] * len(record.blocks)
    return {"blocks": list(record.blocks), "mi": list(record.mi), "weights": list(record.weights),
            "converged": [v == "converged" for v in verdicts] if any(v is not None for v in verdicts) else None,
            "change": [r.get("change") for r in reports], "mi_model": record.mi_model}


def mi_history_series(mi):
    """{block: [bound at epoch 1, 2, ...]} for the blocks with a recorded history."""
    record = MIRecord.from_dict(read_json(mi))
    return {b: list(h) for b, h in zip(record.blocks, record.history or []) if h}


def eval_rows(eval_dir):
    """Per-epoch rows of a downstream evaluation: the curve in results.json, else log.jsonl
    (a run that has not finished has only the log)."""
    eval_dir = Path(eval_dir)
    try:
        curve = read_json(eval_dir / RESULTS)["curve"]
    except (OSError, ValueError, KeyError):
        curve = None
    return curve if curve is not None else read_log(eval_dir / LOG)


def eval_groups(run_dir):
    """{figure group: {row name: eval folder}} of a run, so each attack's task gets one figure: the
    layout.json the runner wrote (pipeline.plan.Plan.layout), whose folders exist; {} without one."""
    try:
        layout = read_json(Path(run_dir) / LAYOUT)["eval"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    groups = {}
    for group, rows in layout.items():
        found = {row: Path(run_dir) / folder for row, folder in rows.items()
                 if (Path(run_dir) / folder / RESULTS).exists() or (Path(run_dir) / folder / LOG).exists()}
        if found:
            groups[group] = found
    return groups


def stage_dirs(run_dir):
    """Stage folders of a run: the folder itself when a stage script wrote it (it holds a log.jsonl),
    and its direct subfolders holding one (a runner's stages, or stage 3's downstream_<dataset>)."""
    run_dir = Path(run_dir)
    below = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / LOG).exists()]
    return [run_dir] * (run_dir / LOG).exists() + below


def seed_folders(results_dir):
    """{seed: folder} of the seed_* subfolders that hold a summary.json (seed as int when numeric)."""
    found = {}
    for folder in sorted(Path(results_dir).glob("seed_*")):
        if (folder / SUMMARY).exists():
            seed = folder.name.removeprefix("seed_")
            found[int(seed) if seed.isdigit() else seed] = folder
    return dict(sorted(found.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])))


def summary_results(run_dir):
    """The `results` dict of a run's summary.json, {} when it is absent or unreadable."""
    try:
        return Summary.load(Path(run_dir) / SUMMARY).results
    except UserError:
        return {}


def summary_attacks(run_dir):
    """The `attacks` dict of a run's summary.json ({table key: {"attack", "task"}}), {} when absent."""
    try:
        return Summary.load(Path(run_dir) / SUMMARY).attacks or {}
    except UserError:
        return {}


def matrix_data(matrix):
    """Rows, columns (labels), means and stds (rows x columns, NaN where a cell is missing) and the
    number of seeds of an attacks x defences table (report.stats.asr_matrix)."""
    rows = list(matrix)
    methods = list(dict.fromkeys(m for cells in matrix.values() for m in cells))
    nan = float("nan")
    means = [[matrix[r][m]["mean"] if m in matrix[r] else nan for m in methods] for r in rows]
    stds = [[matrix[r][m]["std"] if m in matrix[r] else nan for m in methods] for r in rows]
    seeds = seed_count(c for cells in matrix.values() for c in cells.values())
    return {"rows": rows, "columns": [label(m) for m in methods], "means": means, "stds": stds, "seeds": seeds}


def sweep_lines(methods):
    """One attack and task of report.stats.sweep_data() as lines: {"ratios": sorted fractions,
    "lines": {label: {metric: {"means", "stds"}}} (NaN where a fraction is missing), "fixed": the
    labels of the clean and backdoored encoders, the same at every fraction, "seeds"}."""
    ratios = sorted({r for by in methods.values() for r in by})
    nan = float("nan")
    lines = {label(m): {metric: {"means": [by[r][metric]["mean"] if metric in by.get(r, {}) else nan for r in ratios],
                                 "stds": [by[r][metric]["std"] if metric in by.get(r, {}) else 0.0 for r in ratios]}
                        for metric in ("acc", "asr")} for m, by in methods.items()}
    seeds = seed_count(c for by in methods.values() for cells in by.values() for c in cells.values())
    return {"ratios": ratios, "lines": lines, "fixed": [label(m) for m in methods if m in BASELINES], "seeds": seeds}


def to_uint8(images):
    """(N,H,W,3) uint8 from uint8 NHWC or float [0,1] arrays, NCHW accepted (a converted tensor)."""
    a = np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"expected a batch of images (N,H,W,3), got shape {a.shape}")
    if a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def trigger_difference(clean, triggered):
    """uint8 images of 128 + GAIN x (triggered - clean), clipped: a faint trigger made visible."""
    diff = triggered.astype(np.int16) - clean.astype(np.int16)
    return np.clip(128 + GAIN * diff, 0, 255).astype(np.uint8)


def grid_rows(images_clean, images_triggered, references, view1, view2, max_columns=8, attack=None):
    """[(row label, uint8 NHWC)] in the fixed order, rows given as None left out, at most max_columns each.

    attack: (its label, the clean images with its trigger, uint8 of the same shape) of an attack
    whose trigger the patch row does not show (methods.Attack.sample_trigger); adds its row and its
    amplified difference from the clean images after the patch-triggered row."""
    rows = [images_clean, images_triggered, None, None, references, view1, view2]
    name = attack[0] if attack is not None else ""
    labels = GRID_ROWS[:2] + (f"{name} trigger", f"{name} - clean, x{GAIN}") + GRID_ROWS[2:]
    if attack is not None:
        rows[2:4] = attack[1], trigger_difference(images_clean, attack[1])
    return [(label, to_uint8(images)[:max_columns]) for label, images in zip(labels, rows) if images is not None]


# ---------------------------------------------------------------- drawing

def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n, width=4.0, height=3.2, columns=3):
    """A grid of n axes, at most `columns` wide, the unused ones hidden."""
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _epoch_axis(ax):
    """Whole epochs on the x axis: a 3-epoch run should not show epoch 1.5."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def acc_asr_bars(stats, path):
    """Grouped bars (one group per encoder) of ACC, ASR and ASR excl. target; one panel per task.
    Error bars show the seed std and are left out when every std is zero (a single seed)."""
    if not stats:
        raise NothingToPlot("no results to plot")
    fig, axes = _panels(len(stats), width=6.0, height=4.2, columns=2)
    seeds = 0
    for ax, task in zip(axes, stats):
        data = bar_data(stats, task)
        seeds = max(seeds, data["seeds"])
        x = np.arange(len(data["encoders"]))
        width = 0.8 / max(len(data["metrics"]), 1)
        for i, m in enumerate(data["metrics"]):
            stds = data["stds"][m]
            bars = ax.bar(x + (i - (len(data["metrics"]) - 1) / 2) * width, data["means"][m], width,
                          yerr=stds if any(s > 0 for s in stds) else None, capsize=3, label=METRIC_LABELS[m])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.set_xticks(x, [textwrap.fill(e, 12) for e in data["encoders"]], fontsize=8)
        ax.set_ylabel("%")
        ax.set_ylim(0, 110)
        ax.set_title(task)
        ax.legend(fontsize=8, loc="upper right")
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one run"
    fig.suptitle(f"Downstream accuracy (ACC) and attack success rate (ASR) per encoder ({spread})")
    fig.tight_layout()
    return _save(fig, path)


def attack_matrix(matrix, path):
    """Heatmap of ASR (%) by attack (rows) and encoder (columns), 0 (white) to 100 (dark red), each
    cell labelled with its mean (± std over seeds when there are several)."""
    data = matrix_data(matrix)
    if not data["rows"] or not data["columns"]:
        raise NothingToPlot("no attacks x defences table")
    means = np.array(data["means"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(data["columns"]) + 3.5, 0.7 * len(data["rows"]) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(means), cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(means):
        for j, value in enumerate(row):
            if not math.isnan(value):
                text = f"{value:.0f}" + (f"\n± {data['stds'][i][j]:.0f}" if data["seeds"] > 1 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if value > 60 else "black")
    ax.set_xticks(range(len(data["columns"])), [textwrap.fill(c, 12) for c in data["columns"]], fontsize=8)
    ax.set_yticks(range(len(data["rows"])), [textwrap.fill(r, 28) for r in data["rows"]], fontsize=8)
    fig.colorbar(image, ax=ax, label="ASR (%)")
    spread = f"mean ± std over {data['seeds']} seeds" if data["seeds"] > 1 else "one run"
    ax.set_title(f"Attack success rate by attack and defence ({spread})")
    fig.tight_layout()
    return _save(fig, path)


def ratio_sweep(sweep, path):
    """ACC and ASR (%) against the clean-data fraction (log axis), one line per encoder with the seed
    std as whiskers, one row of two panels per attack and task of report.stats.sweep_data(). The
    clean and backdoored encoders do not depend on the fraction: dashed."""
    if not sweep:
        raise NothingToPlot("no clean-data fraction sweep")
    fig, axes = plt.subplots(len(sweep), 2, figsize=(11, 4.2 * len(sweep)), squeeze=False)
    seeds = 0
    for row, ((attack, task), methods) in zip(axes, sweep.items()):
        data = sweep_lines(methods)
        seeds = max(seeds, data["seeds"])
        for ax, metric in zip(row, ("acc", "asr")):
            for name, line in data["lines"].items():
                ax.errorbar(data["ratios"], line[metric]["means"], yerr=line[metric]["stds"], marker="o", capsize=3,
                            linestyle="--" if name in data["fixed"] else "-", label=name)
            ax.set_xscale("log")
            ax.set_xticks(data["ratios"], [f"{100 * r:g}%" for r in data["ratios"]])
            ax.minorticks_off()
            ax.set_xlabel("clean data given to the defence (share of the pre-training set)")
            ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
            ax.set_ylim(0, 105)
            ax.grid(alpha=0.3)
            ax.set_title(f"{attack_label(attack)} on {task}: {METRIC_LABELS[metric]}")
        row[1].legend(fontsize=8, loc="best")
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one run"
    fig.suptitle(f"Defences against the clean-data fraction ({spread})")
    fig.tight_layout()
    return _save(fig, path)


def training_curves(stage_dir, path):
    """One panel per logged loss term over epochs, plus kNN accuracy (%) at the epochs it was measured."""
    series = log_series(read_log(Path(stage_dir) / "log.jsonl"))
    if not series:
        raise NothingToPlot(f"no epochs logged in {stage_dir}")
    knn = series.pop("knn_acc", None)
    names = {**TOTAL_LABELS, **term_labels()}
    panels = [(names.get(n, n), "loss", s) for n, s in series.items()]
    panels += [("kNN accuracy", "kNN accuracy (%)", knn)] if knn else []
    fig, axes = _panels(len(panels))
    for ax, (title, ylabel, s) in zip(axes, panels):
        ax.plot(s["epoch"], s["value"], marker="o" if len(s["epoch"]) <= 30 else None, markersize=3,
                color="tab:green" if s is knn else "tab:blue")
        ax.set(title=title, ylabel=ylabel)
        _epoch_axis(ax)
    fig.suptitle(f"Training curves: {Path(stage_dir).name}")
    fig.tight_layout()
    return _save(fig, path)


def mi_weights(mi_json, path):
    """MI of each block with the representation (nats) beside the attention weight it gives.
    Blocks whose estimator did not converge (when recorded) are hatched and marked; under each MI bar,
    the estimate's relative change over the second half of the estimator's epochs (the verdict's
    `change`), when recorded."""
    data = mi_data(read_json(mi_json))
    if not data["mi"]:
        raise NothingToPlot(f"no MI values in {mi_json}")
    failed = [c is False for c in data["converged"]] if data["converged"] else [False] * len(data["mi"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, ylabel, color in ((axes[0], "mi", "MI (nats)", "tab:purple"),
                                   (axes[1], "weights", "attention weight", "tab:orange")):
        bars = ax.bar(data["blocks"][:len(data[key])], data[key], color=color)
        for bar, bad in zip(bars, failed):
            if bad:
                bar.set(hatch="//", edgecolor="red", alpha=0.6)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set(xlabel="block", ylabel=ylabel, title=ylabel.split(" (")[0] + " per block")
        ax.margins(y=0.15)
    changes = [f"{b}\n{c:+.0%}" if c is not None else b for b, c in zip(data["blocks"], data["change"])]
    if any(c is not None for c in data["change"]):
        axes[0].set_xticks(range(len(changes)), changes)
        axes[0].set_xlabel("block, and change of the estimate over the second half of its epochs")
    if any(failed):
        axes[0].legend(handles=[Patch(hatch="//", edgecolor="red", facecolor="white",
                                      label="estimator not converged")], fontsize=8)
    fig.suptitle(f"Block-wise MI with the final representation ({data['mi_model'] or 'estimated'} model) "
                 "and the resulting weights")
    fig.tight_layout()
    return _save(fig, path)


def mi_history(mi_json, path):
    """The MI estimator's lower bound (nats) per epoch, one line per block: flat tails mean it converged."""
    mi = read_json(mi_json)
    series = mi_history_series(mi)
    if not series:
        raise NothingToPlot(f"no MI history in {mi_json}")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for block, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=block)
    ax.set(ylabel="MI lower bound (nats)",
           title=f"MI estimator bound per epoch ({mi.get('mi_model', 'estimated')} model)")
    _epoch_axis(ax)
    ax.legend(title="block")
    fig.tight_layout()
    return _save(fig, path)


def downstream_curves(eval_dirs, path):
    """ACC, ASR and ASR excl. target (%) over the classifier's epochs, one line per evaluated encoder."""
    curves = {label(method): log_series(eval_rows(folder)) for method, folder in eval_dirs.items()}
    metrics = [m for m in METRIC_LABELS if any(m in c for c in curves.values())]
    if not metrics:
        raise NothingToPlot("no downstream epochs logged")
    fig, axes = _panels(len(metrics), width=4.6, height=3.6)
    for ax, m in zip(axes, metrics):
        for name, curve in curves.items():
            if m in curve:
                ax.plot(curve[m]["epoch"], curve[m]["value"], marker="o", markersize=3, label=name)
        ax.set(title=METRIC_LABELS[m], ylabel=f"{METRIC_LABELS[m]} (%)", ylim=(-2, 102))
        _epoch_axis(ax)
    axes[0].legend(fontsize=8, title="encoder")
    fig.suptitle("Downstream classifier over epochs")
    fig.tight_layout()
    return _save(fig, path)


def sample_grid(images_clean, images_triggered, references, view1, view2, path, max_columns=8, attack=None):
    """One labelled row per kind of image: uint8 (N,H,W,3) arrays, or float [0,1] arrays for the
    augmented views; pass None for a row to leave it out; attack as for grid_rows."""
    rows = grid_rows(images_clean, images_triggered, references, view1, view2, max_columns, attack)
    if not rows:
        raise NothingToPlot("no images given")
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 0.8, 1.35 * len(rows)), squeeze=False)
    for ax_row, (row_name, images) in zip(axes, rows):
        for j, ax in enumerate(ax_row):
            if j < len(images):
                ax.imshow(images[j], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.axis("off")
        ax_row[0].set_ylabel(row_name, rotation=0, ha="right", va="center")
    fig.suptitle("Sample images")
    fig.tight_layout()
    return _save(fig, path)


def detection_data(run_dir):
    """The triggers a detection defence recovered in one seed folder, from its layout.json:
    [(detector, table, [(title, uint8 HxWx3 image or None)])], the attack's real trigger first
    (its trigger file stamped on a black image; none for a trigger without a file), then
    each encoder's recovered mask x pattern (None where no trigger was found), titled with its
    score and verdict. [] without detection."""
    from datasets import load_trigger, stamp_trigger      # here: only this figure reads trigger files
    run_dir = Path(run_dir)
    layout = read_json(run_dir / LAYOUT)
    out = []
    for detector, tables in layout.get("detect", {}).items():
        for table, rows in tables.items():
            images = []
            trigger = layout.get("triggers", {}).get(table)
            if trigger is not None:
                t, tm = load_trigger(ROOT / trigger)        # ROOT / an absolute path is that path
                images.append(("real trigger", stamp_trigger(np.zeros((1, *t.shape), np.uint8), t, tm)[0]))
            for row, folder in rows.items():
                results = run_dir / folder / RESULTS
                if not results.exists():
                    continue
                found = read_json(results)
                image = None
                if (run_dir / folder / DETECTED_TRIGGER).exists():
                    with np.load(run_dir / folder / DETECTED_TRIGGER) as npz:
                        image = np.clip(npz["mask"][..., None] * npz["pattern"], 0, 255).astype(np.uint8)
                score = found.get("pl1", found.get("score"))
                images.append((f"{label(row)}\n{score:.3g}, {found.get('verdict', '?')}", image))
            out.append((detector, table, images))
    if not any(len(images) > 1 for _, _, images in out):
        raise NothingToPlot("no detection results")
    return out


def detection_figure(run_dir, path):
    """figures/detection.png: per detection defence and attack table, the real trigger beside the
    trigger recovered from each encoder (blank where none was found), titled with score and verdict."""
    data = detection_data(run_dir)
    cols = max(len(images) for _, _, images in data)
    fig, axes = plt.subplots(len(data), cols, figsize=(1.6 * cols + 1.2, 2.3 * len(data) + 0.3), squeeze=False)
    for ax_row, (detector, table, images) in zip(axes, data):
        for j, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.axis("off")
                continue
            title, image = images[j]
            if image is None:
                ax.text(0.5, 0.5, "none found", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=7)
        ax_row[0].set_ylabel(f"{label(detector)}\n{textwrap.fill(table, 22)}", fontsize=7, rotation=0, ha="right",
                             va="center")
    fig.suptitle(f"Recovered triggers (mask x pattern): score, verdict ({Path(run_dir).name})")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- a whole folder

def skip_reason(error, source):
    """Why a figure was skipped, in one plain line: what is wrong with which file, not the text of
    the exception that found it (a UserError's own line is already plain)."""
    where = f"{source} " if isinstance(source, (str, Path)) else "its source "
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, json.JSONDecodeError):
        return f"{where}is not valid JSON (damaged or cut short at line {error.lineno})"
    if isinstance(error, OSError):
        return f"cannot read {error.filename or source}" + (f" ({error.strerror.lower()})" if error.strerror else "")
    if isinstance(error, KeyError):
        return f"{where}has no {error.args[0]!r} entry (written by another version, or damaged)"
    return f"{where}holds a value that cannot be drawn (written by another version, or damaged)"


def _draw(function, source, path):
    """Draw one figure; a source with nothing in it is skipped silently, a damaged one with a warning,
    so one bad file never stops the others."""
    try:
        return function(source, path)
    except NothingToPlot:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as error:
        plt.close("all")
        print(f"warning: skipped {Path(path).name}: {skip_reason(error, source)}", file=sys.stderr)
        return None


def run_jobs(run_dir, out_dir, prefix=""):
    """(draw function, source, png path) for every stage, mi.json and evaluated task of one run."""
    jobs = []
    for stage in stage_dirs(run_dir):
        jobs.append((training_curves, stage, out_dir / f"{prefix}training_{stage.name}.png"))
        if (stage / MI).exists():
            jobs.append((mi_weights, stage / MI, out_dir / f"{prefix}mi_weights_{stage.name}.png"))
            jobs.append((mi_history, stage / MI, out_dir / f"{prefix}mi_history_{stage.name}.png"))
    for dataset, folders in eval_groups(run_dir).items():
        jobs.append((downstream_curves, folders, out_dir / f"{prefix}downstream_{dataset}.png"))
    return jobs


def plot_results(results_dir):
    """Write <results_dir>/figures/*.png for whatever the folder holds; returns the written paths.

    With seed_* subfolders (each with a summary.json) the bars show mean ± std over seeds and each
    seed's curves get a `seed_<s>_` prefix; otherwise the folder is one run. With more than one
    attack, attack_matrix.png is the attacks x defences ASR heatmap; with a clean-data fraction
    sweep (run_pipeline.py --ratios), ratio_sweep.png draws ACC and ASR against the fraction.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder at {root}")
    out = root / "figures"
    seeds = seed_folders(root)
    runs = seeds or {None: root}
    per_seed = {seed: r for seed, folder in runs.items() if (r := summary_results(folder))}
    stats = summarize_seeds(per_seed)
    jobs = [(acc_asr_bars, stats, out / "acc_asr.png")] if per_seed else []
    attacks = {t: a for folder in runs.values() for t, a in summary_attacks(folder).items()}
    if several_attacks(attacks):
        jobs.append((attack_matrix, asr_matrix(stats, attacks), out / "attack_matrix.png"))
    sweep = sweep_data(stats, attacks)
    if sweep:
        jobs.append((ratio_sweep, sweep, out / "ratio_sweep.png"))
    first = next(iter(runs.values()))
    if (first / LAYOUT).exists() and read_json(first / LAYOUT).get("detect"):
        jobs.append((detection_figure, first, out / "detection.png"))
    for folder in runs.values():
        jobs += run_jobs(folder, out, prefix=f"{folder.name}_" if seeds else "")
    return [p for p in (_draw(*job) for job in jobs) if p is not None]
