"""Run the whole pipeline with one command: clean encoder -> BadEncoder -> MIMIC, its two controls
and the baseline defences -> ACC/ASR, over one seed or several.

    python run_pipeline.py                   # the CPU demo on generated data (docs/demo.md)
    python run_pipeline.py --preset paper    # the paper's settings on prepared CIFAR-10/GTSRB/SVHN/STL-10 (GPU)
    python run_pipeline.py --preset paper --tasks gtsrb,svhn --seeds 1 2 3   # two of its tasks, three seeds
    python run_pipeline.py --pretraining_dataset mine --task mine:1   # your own data, made with
                                             # python prepare_data.py --image_folder DIR --name mine
    python run_pipeline.py --attacks badencoder,ctrl   # every defence against both attacks (docs/ctrl.md)

Each stage is one of the stage scripts, called as a user would (the command is printed first);
independent stages run side by side (--jobs). The controls are MIMIC with uniform attention
weights (no MI) and a student trained with the contrastive loss alone (no teacher). A stage whose
folder holds the results of the same command is reused; one with a checkpoint.pth is resumed.

With --attacks badencoder,ctrl the defences also run on a CTRL encoder (stage 0 on a poisoned
copy of the pre-training data, <data_dir>/<pretraining>_ctrl_t<target>_p<ratio>_m<mag>_w<window>/,
made as prepare_data.py --poison makes it) evaluated on the pre-training dataset itself, and summary.md ends with
an attacks x defences ASR table (figures/attack_matrix.png).

Writes <results_dir>/summary.json and summary.md (ACC/ASR per encoder, which defences left the
backdoor in place, MIMIC's MI per block with the estimator's verdict) and figures/*.png. With
--seeds, each seed runs in <results_dir>/seed_<s>/ and the top-level summary gives per-seed
values, mean, sample std and MIMIC's paired differences from every control and defence.
"""
import argparse
import os
import time
from pathlib import Path

import methods
from datasets.npz import npz_shape, split_path
from pipeline.data import (ROOT, attack_list, defence_ids, detector_list, method_list, name_list, prepare_data,
                           ratio_list, select_data, stage_flags, task_spec)
from pipeline.plan import Plan, check_flags, seed_jobs, stage_scripts
from pipeline.presets import PRESETS
from pipeline.pretrained import shipped_clean
from pipeline.runner import Runner, hold_runner_lock
from pipeline.samples import draw_figures
from pipeline.summary import write_summaries
from utils.cli import PROTOCOLS, positive_int, run_cli, seed_int

def get_parser():
    parser = argparse.ArgumentParser(description="Run stages 0-3, the defences and two controls; summarise "
                                                 "ACC/ASR over one or more seeds.")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="demo: generated data, CPU-sized; paper: the paper's settings on prepared real "
                             "data, for a GPU. With --pretraining_dataset/--task it supplies only the stage "
                             "flags (default: demo)")
    parser.add_argument("--results_dir", default=None, help="where every stage writes (default: output/<preset>)")
    parser.add_argument("--device", default="auto", help="passed to every stage (default: auto)")
    parser.add_argument("--seed", type=seed_int, default=100, help="passed to every stage (default: 100)")
    parser.add_argument("--protocol", default="ours", choices=PROTOCOLS,
                        help="passed to every stage: authors sets every stage's behaviour to the authors' code "
                             "(docs/fidelity.md); the stage flags of the preset and --<stage>_args still win "
                             "(default: ours)")
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=None, metavar="S",
                        help="run the whole pipeline once per seed in <results_dir>/seed_<s>/ and summarise "
                             "over the seeds (default: --seed alone, written to <results_dir>/)")
    parser.add_argument("--defenses", type=method_list, default=list(defence_ids()), metavar="LIST",
                        help="comma-separated defences run on each backdoored encoder, shown in this order in "
                             "the tables: " + "; ".join(f"{i}: {d.doc}" for i, d in methods.defences(False).items())
                             + f" (default: {','.join(defence_ids())})")
    parser.add_argument("--no_controls", action="store_true", help="skip the two control students")
    parser.add_argument("--train_clean", action="store_true",
                        help="train stage 0 in this run even when the preset ships its clean encoder (the demo's "
                             "is pretrained/demo_clean.pth, stage 0 of the demo preset at seed 100, used by every "
                             "seed; default: the shipped encoder when there is one)")
    first = methods.first_attack()
    parser.add_argument("--attacks", type=attack_list, default=[first], metavar="LIST",
                        help="comma-separated attacks every defence runs against: " + "; ".join(
                            f"{i}: {a.doc}" for i, a in methods.attacks().items()) + f" (default: {first})")
    for attack in methods.attacks().values():
        attack.add_runner_args(parser)
    parser.add_argument("--detect", type=detector_list, default=[], metavar="LIST",
                        help="comma-separated detection defences run on every encoder of the tables (the clean one, "
                             "each attack's, every defence's and control's), each encoder once: " + "; ".join(
                                 f"{i}: {d.doc}" for i, d in methods.detectors().items()) + " (default: none)")
    parser.add_argument("--ratios", type=ratio_list, default=None, metavar="LIST",
                        help="the clean-data fraction sweep: comma-separated fractions of the pre-training images "
                             "given to MIMIC, its controls and the baselines, each run at every fraction against "
                             "the same clean and backdoored encoders (e.g. 0.01,0.04,0.2; summary.md gets a table "
                             "per fraction, figures/ratio_sweep.png) (default: the preset's --ratio alone)")
    parser.add_argument("--sweep_budget", default="steps", choices=["steps", "epochs"],
                        help="what a student of the sweep keeps from the preset's student at the preset's own "
                             "fraction: its optimiser steps (its --epochs scaled by the subset's size: at 5x the "
                             "data, a fifth of the epochs), or its epochs (5x the steps and the time at 5x the "
                             "data); the baselines keep their epochs either way (default: steps)")
    data = parser.add_argument_group("data (default: the preset's)")
    data.add_argument("--data_dir", default="data", help="dataset folder (default: data)")
    data.add_argument("--pretraining_dataset", default=None,
                      help="dataset under --data_dir the encoders are pre-trained on, e.g. one made by "
                           "prepare_data.py --image_folder (default: the preset's)")
    data.add_argument("--task", type=task_spec, action="append", default=None, metavar="DATASET:LABEL[:REFERENCE]",
                      help="a downstream task (repeatable): dataset under --data_dir, the attacker's target "
                           "label and its reference file; without REFERENCE one is made as prepare_data.py "
                           "--make_reference does, in <reference_dir>/<pretraining_dataset>/<dataset>_<label>.npz "
                           "(default: the preset's tasks)")
    data.add_argument("--reference_dir", default=str(ROOT / "reference"),
                      help="where the reference files of --task without REFERENCE are made (default: reference/)")
    data.add_argument("--tasks", type=name_list, default=None, metavar="LIST",
                      help="comma-separated subset of the preset's tasks, by downstream dataset (default: all)")
    run = parser.add_argument_group("scheduling")
    run.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                     help="stages run side by side when they do not depend on each other; the numbers do not "
                          "depend on it (default: the number of cores)")
    run.add_argument("--threads", type=positive_int, default=1,
                     help="CPU threads of each stage; part of what decides a stage's float rounding, so it is "
                          "the same for every stage whatever --jobs is (default: 1)")
    run.add_argument("--nproc_per_node", type=positive_int, default=1,
                     help="processes (GPUs) per training stage; above 1 the stages run under torchrun and each "
                          "process gets global batch / N images per step (default: 1)")
    for stage in stage_scripts():
        parser.add_argument(f"--{stage}_args", default="",
                            help=f"extra flags appended to every {stage} command, e.g. --mimic_args \"--epochs 50\" "
                                 f"(later flags win) (default: none)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def method_options(args):
    """{flag: value} of the methods' own flags (Attack.add_runner_args), which Plan.options keeps."""
    own = argparse.ArgumentParser(add_help=False)
    for attack in methods.attacks().values():
        attack.add_runner_args(own)
    return {a.dest: getattr(args, a.dest) for a in own._actions}


def main(args):
    began = time.time()
    preset = PRESETS[args.preset]
    pretraining, tasks = select_data(preset, args.preset, args.pretraining_dataset, args.task, args.tasks)
    own = bool(args.pretraining_dataset or args.task)
    out_dir = Path(args.results_dir or f"output/{args.preset}").resolve()
    data_dir = Path(args.data_dir).resolve()
    extra = {s: stage_flags(getattr(args, f"{s}_args"), f"--{s}_args") for s in stage_scripts()}
    plan = Plan(args.preset, preset, pretraining, tasks, args.defenses, not args.no_controls, extra,
                args.nproc_per_node, str(data_dir), args.device, args.protocol,
                demo_checks=args.preset == "demo" and not own, attacks=args.attacks, options=method_options(args),
                clean_encoder=shipped_clean(preset, pretraining, args.train_clean), ratios=args.ratios,
                sweep_budget=args.sweep_budget, detectors=args.detect, reference_dir=args.reference_dir)
    plan.check_batches()                    # a batch that does not split, a method without flags: before any work
    lock = hold_runner_lock(out_dir)
    try:
        prepare_data(plan, "this run" if own else f"the {args.preset} preset", args.reference_dir)
        plan.check_ratios(npz_shape(split_path(data_dir, pretraining, "train"), "x")[0])
        seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
        folders = {s: out_dir / f"seed_{s}" if args.seeds else out_dir for s in seeds}
        keys = {s: f"seed_{s}/" if args.seeds else "" for s in seeds}
        runner = Runner(out_dir, [], threads=args.threads, nproc=args.nproc_per_node)
        jobs = [j for s in seeds for j in seed_jobs(plan, s, folders[s], keys[s])]
        check_flags(plan, jobs)
        done = runner.run(jobs, parallel=args.jobs)
        wall = round(time.time() - began, 1)
        write_summaries(plan, out_dir, folders, keys, done, runner.times, wall, over_seeds=bool(args.seeds))
        print("\n" + (out_dir / "summary.md").read_text())
        draw_figures(out_dir, plan, seeds[0])
        print(f"wall time {wall:.0f} s; summary in {out_dir / 'summary.md'}")
    finally:
        lock.release()


if __name__ == "__main__":
    run_cli(main, get_parser())
