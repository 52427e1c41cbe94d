"""Seed statistics of pipeline results: mean and spread per encoder, and paired differences.

Everything here takes and returns plain dicts of numbers (no torch, no files), so the multi-seed
runner can call it on the `results` dicts of its seeds' summary.json and a test can check every
number by hand. Metrics are percentages, as the downstream stage reports them.
"""
import statistics

import methods
from methods import BASELINES, attack_label, fraction_text, label, matrix_row
from methods.mimic import MIMIC

METRIC_LABELS = {"acc": "ACC", "asr": "ASR", "asr_excluding_target": "ASR excl. target"}


def spread(values):
    """{seed: v} -> {"values", "mean", "std"}; std is the sample standard deviation (ddof=1),
    0.0 with a single seed, because one run says nothing about the seed-to-seed spread."""
    numbers = list(values.values())
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return {"values": dict(values), "mean": statistics.fmean(numbers), "std": std}


def _ordered_union(dicts):
    """Keys of several dicts in first-seen order, so tables follow the pipeline's own order."""
    return list(dict.fromkeys(key for d in dicts for key in d))


def summarize_seeds(per_seed):
    """{seed: {task: {encoder: {metric: v}}}} -> {task: {encoder: {metric: spread}}}.

    A task, encoder or metric missing from some seeds (a partial run) is kept, with values for the
    seeds that have it; mean and std are over those seeds only. None values are treated as missing.
    """
    out = {}
    for task in _ordered_union(per_seed.values()):
        runs = {s: r[task] for s, r in per_seed.items() if task in r}
        out[task] = {}
        for encoder in _ordered_union(runs.values()):
            rows = {s: r[encoder] for s, r in runs.items() if encoder in r}
            out[task][encoder] = {}
            for metric in _ordered_union(rows.values()):
                values = {s: row[metric] for s, row in rows.items() if row.get(metric) is not None}
                if values:
                    out[task][encoder][metric] = spread(values)
    return out


def paired_differences(per_seed, reference=MIMIC, metrics=("acc", "asr", "asr_excluding_target"),
                       against=None):
    """Per seed, reference minus each other encoder; mean and std (ddof=1) of those differences.

    Pairing by seed removes the variation every encoder of one seed shares (same clean encoder,
    same backdoored teacher, same data order), so a small but consistent gap shows up. `against`
    defaults to every encoder except the reference and the clean/backdoored baselines, i.e. the
    controls. Only seeds where both encoders have the metric count.
    Returns {task: {other: {metric: {"values": {seed: d}, "mean", "std"}}}}.
    """
    out = {}
    for task in _ordered_union(per_seed.values()):
        runs = {s: r[task] for s, r in per_seed.items() if reference in r.get(task, {})}
        others = against if against is not None else [
            e for e in _ordered_union(runs.values()) if e != reference and e not in BASELINES]
        for other in others:
            for metric in metrics:
                diffs = {s: rows[reference][metric] - rows[other][metric] for s, rows in runs.items()
                         if rows[reference].get(metric) is not None
                         and rows.get(other, {}).get(metric) is not None}
                if diffs:
                    out.setdefault(task, {}).setdefault(other, {})[metric] = spread(diffs)
    return out


def mean_std(cell):
    """'12.3 ± 0.4' for a spread dict."""
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def seed_count(cells):
    """The most seeds behind any of these spread cells (0 for none): a table says "mean ± std over
    N seeds" with it, and shows a lone value when N is 1."""
    return max((len(c["values"]) for c in cells), default=0)


def _cell(cell, seeds):
    """mean_std(cell) over several seeds, the value alone over one."""
    return mean_std(cell) if seeds > 1 else f"{cell['mean']:.1f}"


def per_seed_text(cell):
    """'1: 12.0, 2: 12.6' so a reader sees which seed gave which value."""
    return ", ".join(f"{seed}: {value:.1f}" for seed, value in cell["values"].items())


def _table(first_header, rows, unit="%"):
    """rows: {row name: {metric: spread}} -> markdown lines with mean ± std and per-seed columns."""
    metrics = _ordered_union(rows.values())
    header = [first_header]
    for m in metrics:
        header += [f"{METRIC_LABELS.get(m, m)} ({unit}) mean ± std", f"{METRIC_LABELS.get(m, m)} per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, cells in rows.items():
        row = [name]
        for m in metrics:
            row += [mean_std(cells[m]), per_seed_text(cells[m])] if m in cells else ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_title(attacks, table):
    """The heading of a summary table: its key, BadEncoder's prefixed with the attack when other
    attacks ran too (the others' keys carry theirs, methods.table_key)."""
    kinds = {a["attack"] for a in attacks.values()}
    attack = attacks.get(table, {}).get("attack", methods.first_attack())
    return f"{attack_label(attack)}: {table}" if not methods.named(attack) and len(kinds) > 1 else table


def several_attacks(attacks):
    """True when the tables of `attacks` ({table key: {"attack", "task"}}) come from more than one
    attack: only then do summaries show the attacks x defences table and its figure."""
    return len({a["attack"] for a in attacks.values()}) > 1


def asr_matrix(stats, attacks, metric="asr"):
    """The attacks x defences table: {row: {method id: spread}} from summarize_seeds() output.

    attacks: {table key: {"attack", "task"}} as a Summary holds it; a table it does not name is
    the first attack's on the task of that name. Rows (methods.matrix_row) follow the tables' order."""
    out = {}
    for table, rows in stats.items():
        who = attacks.get(table, {"attack": methods.first_attack(), "task": table})
        out[matrix_row(who["attack"], who["task"], who.get("ratio"))] = {
            m: cells[metric] for m, cells in rows.items() if metric in cells}
    return out


def sweep_data(stats, attacks):
    """The clean-data fraction sweep (run_pipeline.py --ratios) regrouped from summarize_seeds()
    output: {(attack, task): {method id: {ratio: {metric: spread}}}}, fractions in increasing order.
    Only tables whose `attacks` entry has a "ratio" count; {} without a sweep."""
    out = {}
    for table, rows in stats.items():
        who = attacks.get(table, {})
        if who.get("ratio") is None:
            continue
        group = out.setdefault((who["attack"], who["task"]), {})
        for method, cells in rows.items():
            group.setdefault(method, {})[who["ratio"]] = cells
    return {g: {m: dict(sorted(by.items())) for m, by in methods.items()} for g, methods in out.items()}


def markdown_sweep_table(sweep):
    """Markdown: per attack and task of a sweep_data(), rows = encoders, columns = fractions, each
    cell 'ACC / ASR' (mean ± sample std over seeds, the value alone with one seed); "" without a sweep."""
    lines = []
    for (attack, task), methods in sweep.items():
        ratios = sorted({r for by in methods.values() for r in by})
        seeds = seed_count(c for by in methods.values() for cells in by.values() for c in cells.values())
        over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
        lines += [f"### {attack_label(attack)} on {task}: ACC / ASR (%) by clean-data fraction ({over})", "",
                  "| encoder | " + " | ".join(fraction_text(r) for r in ratios) + " |",
                  "|" + "---|" * (len(ratios) + 1)]
        for method, by in methods.items():
            shown = [f"{_cell(by[r]['acc'], seeds)} / {_cell(by[r]['asr'], seeds)}"
                     if r in by and "acc" in by[r] and "asr" in by[r] else "" for r in ratios]
            lines.append(f"| {label(method)} | " + " | ".join(shown) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown_asr_matrix(matrix, metric="asr"):
    """Markdown: rows = attack on task, columns = encoders (method ids, shown by label); each cell
    the mean ± sample std over seeds, the value alone with one seed."""
    methods = _ordered_union(matrix.values())
    seeds = seed_count(c for cells in matrix.values() for c in cells.values())
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"### {METRIC_LABELS.get(metric, metric)} (%) by attack and defence ({over})", "",
             "| attack | " + " | ".join(label(m) for m in methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for row, cells in matrix.items():
        shown = [_cell(cells[m], seeds) if m in cells else "" for m in methods]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines + [""])


def markdown_seed_table(summary_stats, paired, reference=MIMIC, attacks=None):
    """Markdown: one table per attack and task (rows = encoders, by method id), then the
    paired-difference table."""
    lines = []
    for task, rows in summary_stats.items():
        lines += [f"### {table_title(attacks or {}, task)}", ""]
        lines += _table("encoder", {label(m): cells for m, cells in rows.items()}) + [""]
    if paired:
        lines += [f"### Paired differences: {label(reference)} minus other encoder, same seed (percentage points)",
                  ""]
        flat = {f"{table_title(attacks or {}, task)}: {label(other)}": cells
                for task, others in paired.items() for other, cells in others.items()}
        lines += _table("task: other encoder", flat, unit="pp") + [""]
    return "\n".join(lines)


def mi_not_converged(mi_by_seed):
    """{seed: {task: {block: {"mi", "weight", "convergence"}}}} -> a {"seed", "task", "block",
    "convergence"} dict per block whose MI estimate did not converge (a verdict of None, not
    recorded, is not counted)."""
    return [{"seed": seed, "task": task, "block": block, "convergence": b["convergence"]}
            for seed, tasks in mi_by_seed.items() for task, blocks in tasks.items()
            for block, b in blocks.items() if b["convergence"] not in (None, "converged")]


def markdown_mi_table(mi_by_seed, attacks=None):
    """Markdown: MIMIC's MI and attention weight per block with the estimator's verdict, then one
    line naming the blocks whose estimate did not converge; "" without MIMIC runs. Tables are
    headed as table_title heads them."""
    def title(task):
        return table_title(attacks or {}, task)
    rows = [f"| {seed} | {title(task)} | {block} | {b['mi']:.4g} | {b['weight']:.4g} | {b['convergence'] or 'not recorded'} |"
            for seed, tasks in mi_by_seed.items() for task, blocks in tasks.items() for block, b in blocks.items()]
    if not rows:
        return ""
    lines = ["### MIMIC: MI per block, attention weight and the estimator's verdict", "",
             "| seed | task | block | MI (nats) | weight | convergence |", "|---|---|---|---|---|---|", *rows, ""]
    failed = mi_not_converged(mi_by_seed)
    if failed:
        groups = {}             # one entry per seed, table and verdict: its blocks
        for f in failed:
            groups.setdefault((f["seed"], f["task"], f["convergence"]), []).append(f["block"])
        where = "; ".join(f"seed {seed}, {title(task)}: {', '.join(blocks)} ({verdict})"
                          for (seed, task, verdict), blocks in groups.items())
        lines += [f"**MI estimate not converged** in {len(failed)} block(s): {where}. MIMIC.py printed why; "
                  "e.g. raise --mi_epochs.", ""]
    return "\n".join(lines)


def detection_stats(per_seed):
    """{detector: {table: {row: {"score": spread over seeds, "flagged": seeds whose verdict is
    "backdoored", "seeds": seeds examined}}}} from {seed: Summary.detection} (seeds without one
    left out); {} when no seed has one."""
    out = {}
    for seed, detection in per_seed.items():
        for detector, tables in (detection or {}).items():
            for table, rows in tables.items():
                for row, reading in rows.items():
                    cell = out.setdefault(detector, {}).setdefault(table, {}).setdefault(row, {"by_seed": {}})
                    cell["by_seed"][seed] = reading
    for tables in out.values():
        for rows in tables.values():
            for row, cell in rows.items():
                readings = cell.pop("by_seed")
                rows[row] = {"score": spread({s: r["score"] for s, r in readings.items()}),
                             "flagged": sum(r["verdict"] == "backdoored" for r in readings.values()),
                             "seeds": len(readings)}
    return out


def markdown_detection_table(stats, attacks=None):
    """Markdown: per detection defence, its score (mean ± std over seeds) and how many seeds it flags
    as backdoored, rows the encoders, columns the attacks' tables (headed as table_title heads
    them); "" without --detect."""
    text = ""
    for detector, tables in (stats or {}).items():
        method = methods.get(detector) if detector in methods.detectors() else None
        name, score = (method.label, method.score_label) if method else (detector, "score")
        keys = list(tables)
        rows = list(dict.fromkeys(r for cells in tables.values() for r in cells))
        text += (f"\n### {name}: is the encoder backdoored? {score} (mean ± std over seeds) and the seeds "
                 f"flagged\n\n| encoder | " + " | ".join(table_title(attacks or {}, k) for k in keys) + " |\n|---|" + "---|" * len(keys) + "\n")
        for row in rows:
            cells = []
            for key in keys:
                cell = tables[key].get(row)
                cells.append("" if cell is None else
                             f"{_number(cell['score'])}, {cell['flagged']}/{cell['seeds']} flagged")
            text += f"| {label(row)} | " + " | ".join(cells) + " |\n"
        text += f"\nThe verdict is {name}'s own ({score} below its --threshold: backdoored).\n"
    return text


def _number(cell):
    """mean ± std of a score spread, to three significant digits (± only with several seeds)."""
    mean = f"{cell['mean']:.3g}"
    return mean if len(cell["values"]) < 2 else f"{mean} ± {cell['std']:.2g}"
