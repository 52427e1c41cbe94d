"""Stage 2 baselines beside MIMIC: fine-tuning, fine-pruning and NAD, adapted to SimCLR encoders.

Each defence reads the suspect encoder and MIMIC's clean subset (the first ratio*N images of the
train split; their labels are never used) and writes an encoder checkpoint that stage 3 evaluates
unchanged. What each original does, what we do and why these defaults: docs/defenses.md.

    finetune      continue SimCLR training of the suspect (backbone and head): NT-Xent on two views
                  under the stage-0 augmentations
    fine_pruning  zero the least active output channels of layer4 (Liu et al. 2018; kept in the
                  weights, see models/pruning.py), then fine-tune as finetune with them held at 0
    nad           teacher = the suspect fine-tuned for --nad_teacher_epochs; the student starts from
                  the suspect and adds attention distillation from the teacher (Li et al. 2021)

On the clean subset of the paper's MIMIC command (4% of CIFAR-10):
    python -u defenses.py --defense finetune --suspect output/cifar10/badencoder_gtsrb/model_200.pth \
        --pretraining_dataset cifar10 --ratio 0.04 --results_dir output/cifar10/finetune_gtsrb
and the same with --defense fine_pruning or --defense nad (and their own --results_dir).
--protocol authors sets what they share with the authors' pipeline as there (docs/fidelity.md).

Reads   the suspect checkpoint, <data_dir>/<pretraining_dataset>/train.npz (and test.npz for
        --prune_max_drop)
Writes  <results_dir>/args.json, log.jsonl, log.csv, checkpoint.pth, model_<epoch>.pth, results.json;
        nad also <results_dir>/teacher/, the teacher's own fine-tuning run (the same files)
"""
import argparse
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datasets import encoder_normalization, load_split, normalization_record, split_input
from datasets.loader import ViewLoader, clean_subset, extract_features, to_input
from models import BLOCKS, encoder_checkpoint, load_encoder
from models.distill import distill_epoch
from models.health import PROBE_IMAGES, check_finite_encoder
from models.knn import knn_predict
from models.pruning import channel_ranking, prune_channels, prune_until, pruned_count
import methods
from utils.cli import (AUTHORS_RUN, StageParser, add_clean_subset, add_distributed_args, add_protocol, add_run_args,
                       learning_rate, nonnegative_float, nonnegative_int, positive_float, positive_int, run_cli,
                       unit_interval)
from utils.device import fast_paths, place
from utils.distributed import distribute, gather_objects, is_main
from utils.errors import UserError
from utils.fingerprint import encoder_usage, file_hash, stage_fingerprint
from utils.lock import RunLock
from utils.seeding import preserved_rng, set_seed
from utils.stage import TrainingRun, check_batchnorm_batch, start_run

# The defences this script runs: those the registry gives it (methods/baselines.py).
OWN = tuple(i for i, d in methods.defences().items() if d.script == "defenses.py")

# --protocol authors: the baselines are this project's adaptations (docs/defenses.md); what they
# share with the authors' code is set as there: float32, and stage 0's augmentation as their code
# runs it, so that a baseline sees the views MIMIC sees under --protocol authors.
AUTHORS = {
    "augment": "torchvision",
    **AUTHORS_RUN,
}


def get_parser():
    parser = StageParser(description="Stage 2 baselines: fine-tuning, fine-pruning or NAD.")
    data = parser.add_argument_group("data")
    data.add_argument("--defense", required=True, choices=OWN, help="which defence to run")
    data.add_argument("--suspect", "--teacher", dest="suspect", required=True,
                      help="suspect (e.g. backdoored) encoder checkpoint; --teacher as in MIMIC.py")
    add_clean_subset(data)
    data.add_argument("--results_dir", default=None,
                      help="where checkpoints and logs go (default: output/<pretraining_dataset>/<defense>)")
    optim = parser.add_argument_group("fine-tuning (every defence)")
    optim.add_argument("--lr", type=learning_rate, default=1e-3,
                       help="Adam learning rate; stage 0's, as fine-tuning continues its training (default: 1e-3)")
    optim.add_argument("--weight_decay", type=nonnegative_float, default=1e-6,
                       help="Adam weight decay (default: 1e-6)")
    optim.add_argument("--batch_size", type=positive_int, default=128,
                       help="images per step in each process, as MIMIC's on the same subset (default: 128)")
    optim.add_argument("--epochs", type=nonnegative_int, default=20,
                       help="epochs over the clean subset; NAD's erasing budget. 0 trains nothing: "
                            "fine_pruning then only prunes (default: 20)")
    optim.add_argument("--temperature", type=positive_float, default=0.5, help="NT-Xent temperature (default: 0.5)")
    optim.add_argument("--augment", default="batched", choices=["batched", "torchvision"],
                       help="augmentation path, as in train_clean_encoder.py (default: batched)")
    prune = parser.add_argument_group("fine_pruning")
    prune.add_argument("--prune_fraction", type=unit_interval, default=0.2,
                       help="fraction of layer4's output channels to prune, least active on the clean subset "
                            "first (default: 0.2; our choice, see docs/defenses.md)")
    prune.add_argument("--prune_max_drop", type=nonnegative_float, default=None,
                       help="Liu et al.'s rule instead of --prune_fraction: prune 1%% of the channels at a "
                            "time while the kNN accuracy stays within this many points of the unpruned "
                            "encoder's. Uses labels the other defences never see: the train images beyond "
                            "the subset (memory bank) and test.npz (queries) (default: off)")
    prune.add_argument("--knn_k", type=positive_int, default=200, help="kNN neighbours for the rule (default: 200)")
    prune.add_argument("--knn_t", type=positive_float, default=0.5, help="kNN temperature for the rule (default: 0.5)")
    nad = parser.add_argument_group("nad")
    nad.add_argument("--nad_teacher_epochs", type=positive_int, default=10,
                     help="epochs of fine-tuning that make the teacher; NAD's 5 to 10 (default: 10)")
    nad.add_argument("--nad_weights", type=nonnegative_float, nargs=4, default=[0.0, 0.0, 0.0, 5000.0],
                     metavar=("L1", "L2", "L3", "L4"),
                     help="attention distillation weight (NAD's beta) of layer1..layer4; NAD's released "
                          "configuration puts 5000 on the last group only (default: 0 0 0 5000)")
    add_distributed_args(add_run_args(parser, seed=100, save_freq=100))
    return add_protocol(parser, AUTHORS, what="what these baselines share with the authors' pipeline, as there")


@dataclass
class Context:
    """What every training run of a defence shares: the clean subset and where and how to run."""
    subset: np.ndarray
    mean: tuple
    std: tuple
    device: torch.device
    amp: bool
    channels_last: bool

    @property
    def probe(self):
        """The health checks' images: the subset's first PROBE_IMAGES under the test transform."""
        return to_input(self.subset[:PROBE_IMAGES], self.mean, self.std, self.device)


@dataclass
class Training:
    """One training run of a defence: the model, its Adam optimiser, the TrainingRun that saves
    them, and what its checkpoints carry besides the weights."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run: TrainingRun
    meta: dict

    def checkpoint(self):
        return encoder_checkpoint(self.model, optimizer=self.optimizer.state_dict(), args=vars(self.run.args),
                                  **self.meta)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the suspect and the train split
    (clean subset; kNN memory bank), plus test.npz for --prune_max_drop. NAD's teacher is made by
    this run from these, and checked on --resume by the hash the student's checkpoints record."""
    usage = encoder_usage(args.suspect, args.pretraining_dataset)
    files = {"suspect": args.suspect, **split_input(args.data_dir, usage, "train")}
    if args.defense == "fine_pruning" and args.prune_max_drop is not None:
        files.update(split_input(args.data_dir, usage, "test"))
    return files


def open_run(model, args, ctx, out_dir, stage, fingerprint):
    """The Adam optimiser and TrainingRun of a defence, resumed under --resume: (training, start, ckpt)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    meta = {"stage": stage, "usage": args.pretraining_dataset, "defense": stage,
            "normalization": normalization_record(args.pretraining_dataset, ctx.mean, ctx.std)}
    run = TrainingRun(out_dir, args, stage,
                      guard=lambda: check_finite_encoder(model, ctx.probe, stage),
                      fingerprint=fingerprint)
    start, ckpt = run.resume(model, optimizer)
    return Training(model, optimizer, run, meta), start, ckpt


def fine_tune(training, start, args, ctx, teacher=None, weights=(0.0,) * len(BLOCKS), after_step=None):
    """Train the model on the clean subset, epochs start+1..args.epochs: NT-Xent on two views, plus
    sum_l weights[l] * attention transfer from the frozen teacher on block l (NAD)."""
    loader = ViewLoader(ctx.subset, args.batch_size, ctx.mean, ctx.std, ctx.device, args.augment,
                        args.num_workers, args.seed)
    trained = distribute(training.model, ctx.device, args.sync_bn)   # DDP under torchrun, else the model itself
    columns = ("loss", "nce", "at") if teacher is not None else ("loss",)
    for epoch in range(start + 1, args.epochs + 1):
        loader.set_epoch(epoch)
        terms = distill_epoch(trained, teacher, loader, training.optimizer, weights, 0.0, args.temperature, epoch,
                              training.run.out_dir, ctx.amp, after_step)
        training.run.log_epoch(epoch, {k: terms[k] for k in columns})
        training.run.save(epoch, training.checkpoint())


def knn_accuracy(model, bank_x, bank_y, test_x, test_y, ctx, k, t):
    """accuracy(channels): kNN accuracy (%) of the test images against the bank with those layer4
    channels pruned. Pruning only zeroes entries of the pooled feature, so one forward pass over
    each set serves every channel set."""
    bank = extract_features(model, bank_x, ctx.mean, ctx.std, ctx.device, desc="kNN bank", normalized=False)
    queries = extract_features(model, test_x, ctx.mean, ctx.std, ctx.device, desc="kNN test", normalized=False)
    bank, queries = bank.to(ctx.device), queries.to(ctx.device)                  # MxD, NxD
    labels, truth = torch.as_tensor(bank_y, device=ctx.device), torch.as_tensor(test_y, device=ctx.device)
    classes = int(max(bank_y.max(), test_y.max())) + 1

    def accuracy(channels):
        keep = torch.ones(bank.shape[1], device=ctx.device)
        keep[torch.as_tensor(channels, dtype=torch.long, device=ctx.device)] = 0
        pred = knn_predict(F.normalize(queries * keep, dim=1), F.normalize(bank * keep, dim=1), labels, classes, k, t)
        return 100.0 * (pred == truth).float().mean().item()
    return accuracy


def choose_pruning(model, x, y, args, ctx):
    """Layer4 channels to prune, least active on the clean subset first: the --prune_fraction
    least active, or under --prune_max_drop as many as keep the kNN accuracy within the drop.
    Returns {"pruned_channels": [...], "pruning": {rule, fraction[, knn_curve]}}."""
    activations = extract_features(model, ctx.subset, ctx.mean, ctx.std, ctx.device, desc="layer4 activations",
                                   normalized=False)                             # NxC channel means
    order = channel_ranking(activations)
    if args.prune_max_drop is None:
        count, rule = pruned_count(len(order), args.prune_fraction), {"rule": "fraction"}
    else:
        n = len(ctx.subset)
        test_x, test_y = load_split(args.data_dir, args.pretraining_dataset, "test")
        accuracy = knn_accuracy(model, x[n:], y[n:], test_x, test_y, ctx, args.knn_k, args.knn_t)
        count, curve = prune_until(order, lambda k: accuracy(order[:k]), args.prune_max_drop,
                                   step=max(1, len(order) // 100))
        rule = {"rule": "knn_drop", "knn_curve": [list(point) for point in curve]}
    return {"pruned_channels": order[:count].tolist(), "pruning": {**rule, "fraction": count / len(order)}}


def nad_teacher(args, ctx, out_dir, ckpt, parsed):
    """NAD's teacher: the suspect fine-tuned as --defense finetune --epochs --nad_teacher_epochs
    would, written to <results_dir>/teacher/ as a run of its own, under that folder's lock (read
    back under --resume, where ckpt is the student's checkpoint: the file must be the one the
    student trained with, by the sha256 the checkpoint records). parsed: the arguments as parsed,
    for the teacher run's fingerprint. Made inside preserved_rng, so the student's run draws the
    same random numbers as without it (even loading an encoder draws them: the model is
    initialised before the weights are loaded). Returns (teacher, sha256 of its file)."""
    folder = out_dir / "teacher"
    path = folder / f"model_{args.nad_teacher_epochs}.pth"
    with preserved_rng():
        if ckpt is not None:      # the teacher's model file was written before the student's first checkpoint
            recorded, current = ckpt.get("nad_teacher_sha256"), file_hash(path) if path.is_file() else None
            if current is None:
                raise UserError(f"--resume: NAD's teacher {path} is missing; start a new --results_dir")
            if current != recorded:
                was = f"sha256 {recorded[:4]}.. -> {current[:4]}.." if recorded else "the student recorded no hash"
                raise UserError(f"--resume: NAD's teacher {path} is not the file the student trained with ({was}); "
                                f"start a new --results_dir")
            teacher, _ = load_encoder(path)
        else:
            folder.mkdir(exist_ok=True)
            with RunLock(folder):
                teacher_args = argparse.Namespace(**{**vars(args), "defense": "finetune", "results_dir": str(folder),
                                                     "epochs": args.nad_teacher_epochs, "resume": False})
                parsed_teacher = argparse.Namespace(**{**vars(parsed), "defense": "finetune",
                                                       "epochs": args.nad_teacher_epochs})
                print(f"NAD teacher: fine-tuning the suspect for {args.nad_teacher_epochs} epochs in {folder}")
                set_seed(args.seed)
                teacher = place(load_encoder(args.suspect)[0], ctx.device, ctx.channels_last)
                training, start, _ = open_run(teacher, teacher_args, ctx, folder, "finetune",
                                              stage_fingerprint("finetune", parsed_teacher, input_files))
                fine_tune(training, start, teacher_args, ctx)
                training.run.finish(training.checkpoint(), clean_images=len(ctx.subset), role="NAD teacher")
    return place(teacher, ctx.device, ctx.channels_last).eval().requires_grad_(False), file_hash(path)


def main(args):
    if args.results_dir is None:
        args.results_dir = f"output/{args.pretraining_dataset or 'cifar10'}/{args.defense}"
    check_batchnorm_batch(args.batch_size)
    parsed = argparse.Namespace(**vars(args))       # as parsed, before defaults are filled in below
    out_dir, device = start_run(args, args.resume, distributed=True, inputs=input_files(args))
    fingerprint = stage_fingerprint(args.defense, args, input_files)
    suspect, suspect_ckpt = load_encoder(args.suspect)
    args.pretraining_dataset, mean, std = encoder_normalization(suspect_ckpt, args.suspect, args.pretraining_dataset,
                                                                args.data_dir)
    x, y = load_split(args.data_dir, args.pretraining_dataset, "train")
    subset = clean_subset(x, args.ratio, args.batch_size)
    if args.defense == "fine_pruning" and args.prune_max_drop is not None and len(subset) == len(x):
        raise UserError("--prune_max_drop uses the train images beyond the clean subset as the kNN memory "
                        "bank, and --ratio 1 leaves none: lower --ratio")
    amp, channels_last = fast_paths(args, device)
    ctx = Context(subset, mean, std, device, amp, channels_last)
    model = place(suspect, device, channels_last)
    check_finite_encoder(model, ctx.probe, args.defense, source=args.suspect)
    training, start, ckpt = open_run(model, args, ctx, out_dir, args.defense, fingerprint)
    print(f"{args.defense}: clean subset of {len(subset)} images")

    teacher, weights, after_step, results = None, (0.0,) * len(BLOCKS), None, {}
    if args.defense == "fine_pruning":
        if ckpt is None:
            choice = gather_objects(choose_pruning(model, x, y, args, ctx) if is_main() else None)[0]
            prune_channels(model, choice["pruned_channels"])
        else:
            choice = {key: ckpt[key] for key in ("pruned_channels", "pruning")}
        pruned = choice["pruned_channels"]
        print(f"pruned {len(pruned)} of {model.feature_dim} layer4 channels, the least active on the clean "
              f"subset (rule: {choice['pruning']['rule']})")
        after_step = functools.partial(prune_channels, model, pruned)       # keep them at 0 while training
        training.meta.update(choice)
        results.update(choice)
    elif args.defense == "nad":
        (teacher, teacher_sha256), weights = nad_teacher(args, ctx, out_dir, ckpt, parsed), tuple(args.nad_weights)
        training.meta.update(nad_weights=list(weights), nad_teacher_sha256=teacher_sha256)
        results.update(nad_weights=dict(zip(BLOCKS, weights)),
                       teacher=str(out_dir / "teacher" / f"model_{args.nad_teacher_epochs}.pth"))

    fine_tune(training, start, args, ctx, teacher, weights, after_step)
    encoder = training.run.finish(training.checkpoint(), clean_images=len(subset), **results)
    print(f"{args.defense} encoder: {encoder}")


if __name__ == "__main__":
    run_cli(main, get_parser())
