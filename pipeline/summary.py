"""The numbers a run ends with: each seed's ACC/ASR table, MIMIC's MI, whether each defence left
the backdoor in place, the demo's checks, and the summary over seeds. Rows are keyed by method id
(methods/) and turned into labels only in the markdown."""
import methods
from methods import BASELINES, fraction_text, label
from methods.mimic import MIMIC, NO_TEACHER
from report.stats import (asr_matrix, detection_stats, markdown_asr_matrix, markdown_detection_table,
                          markdown_mi_table, markdown_seed_table, markdown_sweep_table, mi_not_converged,
                          paired_differences, several_attacks, summarize_seeds, sweep_data, table_title)
from utils.files import save_json
from utils.records import LAYOUT, METRICS, MI, SUMMARY, MIRecord, SeedsSummary, Summary

# A defence left the backdoor in place when its ASR stays this many points above the clean encoder's.
BACKDOOR_LEFT = 10.0


def seed_summary(plan, seed, out_dir, done, key, times):
    """The Summary of one seed from its finished jobs (`done`: job key -> Results; keys start with
    `key`); `times`: seconds of the stages run this time, by job key. One table per attack and task."""
    results, mi, left, attacks = {}, {}, {}, {}
    for table, (attack, task, ratio) in plan.tables().items():
        rows = {}
        for method in plan.encoder_folders(attack, task, ratio):
            found = done.get(f"{key}{plan.eval_folder(attack, task, method, ratio)}")
            if found is not None:
                rows[method] = {m: getattr(found, m) for m in METRICS}
        results[table] = rows
        attacks[table] = {"attack": attack, "task": task.key, **({} if ratio is None else {"ratio": ratio})}
        left[table] = backdoor_left(rows)
        mi_path = out_dir / plan.encoder_folders(attack, task, ratio).get(MIMIC, "-") / MI
        if MIMIC in plan.methods and mi_path.exists():
            mi[table] = MIRecord.load(mi_path).per_block()
    stage_seconds = {k[len(key):]: t for k, t in times.items() if k.startswith(key)}
    summary = Summary(preset=plan.preset_name, seed=seed, results=results, mi=mi,
                      mi_not_converged=mi_not_converged({seed: mi}), backdoor_left=left,
                      stage_seconds=stage_seconds, total_seconds=round(sum(stage_seconds.values()), 1),
                      config=plan.config(), attacks=attacks,
                      asr_matrix=asr_matrix(summarize_seeds({seed: results}), attacks))
    summary.detection = detection_readings(plan, done, key)
    bad = [t for t, a in attacks.items() if a["attack"] == methods.first_attack()]
    if plan.demo_checks and bad:            # the demo's checks are the first attack's, at each fraction of a sweep
        checks = {t: check_demo(results[t]) for t in (bad if plan.ratios else bad[:1])}
        summary.checks = [{"check": f"{fraction_text(attacks[t]['ratio'])}: {c}" if plan.ratios else c, "passed": ok}
                          for t, found in checks.items() for c, ok in found]
    return summary


def detection_readings(plan, done, key):
    """{detector: {table: {row: its reading}}} of a seed's finished detection jobs (methods.Detector.
    reading: score, verdict, seconds); None without --detect."""
    if not plan.detectors:
        return None
    out = {}
    for detector_id, tables in plan.detections().items():
        detector = methods.get(detector_id)
        out[detector_id] = {table: {row: detector.reading(done[f"{key}{folder}"]) for row, folder in rows.items()
                                    if f"{key}{folder}" in done} for table, rows in tables.items()}
    return out


def above_clean(row, clean):
    """Whether an encoder's ASR is more than BACKDOOR_LEFT points above the clean encoder's: a
    backdoor in place (for the backdoored encoder itself: a backdoor planted)."""
    return row["asr"] > clean["asr"] + BACKDOOR_LEFT


def backdoor_left(rows):
    """{method: above_clean(its row)} for every row but the clean and backdoored encoders; {} without
    a clean row."""
    if "clean" not in rows:
        return {}
    return {m: above_clean(r, rows["clean"]) for m, r in rows.items() if m not in BASELINES}


def check_demo(rows):
    """The science the demo must show; returns (description, passed) pairs. MIMIC's checks need its row."""
    clean, bad, mimic, no_teacher = (rows.get(k) for k in ("clean", "backdoored", MIMIC, NO_TEACHER))
    checks = [(f"clean ACC {clean['acc']:.1f} >= 60", clean["acc"] >= 60),
              (f"backdoored ASR {bad['asr']:.1f} >= 90", bad["asr"] >= 90),
              (f"backdoored ACC {bad['acc']:.1f} within 5 of clean {clean['acc']:.1f}",
               abs(bad["acc"] - clean["acc"]) <= 5)]
    if mimic is None:
        return checks
    limit = max(20.0, 2 * clean["asr"])
    checks.append((f"MIMIC ASR {mimic['asr']:.1f} <= {limit:.1f}", mimic["asr"] <= limit))
    checks.append((f"MIMIC ACC {mimic['acc']:.1f} >= clean - 10 = {clean['acc'] - 10:.1f}",
                   mimic["acc"] >= clean["acc"] - 10))
    if no_teacher is not None:
        checks.append((f"MIMIC ACC {mimic['acc']:.1f} > no-teacher ACC {no_teacher['acc']:.1f}",
                       mimic["acc"] > no_teacher["acc"]))
    return checks


def checklist(checks):
    return "\n".join(f"- [{'x' if c['passed'] else ' '}] {c['check']}" for c in checks) + "\n"


def left_lines(left, results, attacks):
    """One markdown line per table (headed as table_title heads it): which defences left the
    backdoor in place, or, where the backdoored encoder of `results` is not above_clean, that the
    attack planted nothing to remove."""
    lines = []
    for task, verdicts in left.items():
        rows = results.get(task, {})
        title = table_title(attacks or {}, task)
        if "clean" in rows and "backdoored" in rows and not above_clean(rows["backdoored"], rows["clean"]):
            lines.append(f"- {title}: no backdoor to remove: the backdoored encoder's ASR "
                         f"{rows['backdoored']['asr']:.1f} is within {BACKDOOR_LEFT:g} points of the clean "
                         f"encoder's {rows['clean']['asr']:.1f}")
            continue
        kept = [label(m) for m, yes in verdicts.items() if yes]
        gone = [label(m) for m, yes in verdicts.items() if not yes]
        lines.append(f"- {title}: backdoor left in place (ASR > clean + {BACKDOOR_LEFT:g}) by "
                     f"{', '.join(kept) or 'none'}; removed by {', '.join(gone) or 'none'}")
    return "\n".join(lines) + "\n" if lines else ""


def matrix_text(matrix, attacks):
    """The attacks x defences ASR table when more than one attack ran ("" otherwise: the one
    attack's tables say it all, and a BadEncoder-only summary.md reads as before attacks were a choice)."""
    return "\n" + markdown_asr_matrix(matrix) if several_attacks(attacks) else ""


def seed_markdown(summary):
    """summary.md of one seed: a table per attack and task, the attacks x defences ASR table (with
    more than one attack), the backdoor verdicts, stage times, checks, MI."""
    lines = []
    for task, rows in summary.results.items():
        lines += [f"### {table_title(summary.attacks, task)}", "",
                  "| encoder | ACC (%) | ASR (%) | ASR excl. target (%) |", "|---|---|---|---|"]
        lines += [f"| {label(m)} | {r['acc']:.2f} | {r['asr']:.2f} | {r['asr_excluding_target']:.2f} |"
                  for m, r in rows.items()]
        lines.append("")
    text = "\n".join(lines) + "\n" + matrix_text(summary.asr_matrix, summary.attacks)
    text += markdown_detection_table(detection_stats({summary.seed: summary.detection}), summary.attacks)
    text += markdown_sweep_table(sweep_data(summarize_seeds({summary.seed: summary.results}), summary.attacks))
    text += left_lines(summary.backdoor_left, summary.results, summary.attacks)
    text += "\n| stage | wall time (s) |\n|---|---|\n" + "".join(
        f"| {name} | {t:.1f} |\n" for name, t in summary.stage_seconds.items())
    if summary.checks:
        text += "\n" + checklist(summary.checks)
    return text + "\n" + markdown_mi_table({summary.seed: summary.mi}, summary.attacks)


def seeds_summary(per_seed, wall_seconds=None):
    """(SeedsSummary, summary.md text) over {seed: Summary}: per task, method and metric the
    per-seed values, mean and sample std; MIMIC minus every other row except clean and backdoored
    (the controls and the defences), paired by seed."""
    results = {seed: s.results for seed, s in per_seed.items()}
    stats = summarize_seeds(results)
    methods = list(dict.fromkeys(m for rows in stats.values() for m in rows))
    against = [m for m in methods if m != MIMIC and m not in BASELINES]
    paired = paired_differences(results, reference=MIMIC, against=against) if MIMIC in methods else {}
    mi = {seed: s.mi for seed, s in per_seed.items()}
    checks = {seed: s.checks for seed, s in per_seed.items() if s.checks}
    attacks = {t: a for s in per_seed.values() for t, a in s.attacks.items()}
    matrix = asr_matrix(stats, attacks)
    summary = SeedsSummary(preset=next(iter(per_seed.values())).preset, seeds=list(per_seed), stats=stats,
                           paired_differences=paired, mi=mi, mi_not_converged=mi_not_converged(mi),
                           backdoor_left={seed: s.backdoor_left for seed, s in per_seed.items()},
                           seed_seconds={seed: s.total_seconds for seed, s in per_seed.items()},
                           wall_seconds=wall_seconds, checks=checks or None, attacks=attacks, asr_matrix=matrix,
                           detection=detection_stats({seed: s.detection for seed, s in per_seed.items()}) or None)
    text = f"## Over seeds {', '.join(map(str, per_seed))}: mean ± sample std\n\n"
    text += markdown_seed_table(stats, paired, attacks=attacks) + matrix_text(matrix, attacks)
    text += markdown_detection_table(summary.detection, attacks)
    text += markdown_sweep_table(sweep_data(stats, attacks))
    text += "".join(f"\n### Seed {seed}\n\n" + left_lines(s.backdoor_left, s.results, s.attacks)
                    for seed, s in per_seed.items())
    text += "".join(f"\n### Demo checks, seed {seed}\n\n" + checklist(c) for seed, c in checks.items())
    text += "\n" + markdown_mi_table(mi, attacks)
    text += "\n| seed | stage time (s) |\n|---|---|\n" + "".join(
        f"| {seed} | {t:.1f} |\n" for seed, t in summary.seed_seconds.items())
    return summary, text


def write_summaries(plan, out_dir, folders, keys, done, times, wall_seconds, over_seeds):
    """summary.json and summary.md of every seed (in folders[seed]) and, over_seeds, of the run
    over all of them in out_dir, from the finished jobs."""
    per_seed = {s: seed_summary(plan, s, folders[s], done, keys[s], times) for s in folders}
    for s, summary in per_seed.items():
        summary.save(folders[s] / SUMMARY)
        save_json(folders[s] / LAYOUT, plan.layout())
        (folders[s] / "summary.md").write_text(seed_markdown(summary))
    if over_seeds:
        summary, text = seeds_summary(per_seed, wall_seconds)
        summary.save(out_dir / SUMMARY)
        (out_dir / "summary.md").write_text(text)
