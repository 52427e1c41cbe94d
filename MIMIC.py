"""Stage 2: remove a backdoor with MIMIC (Han et al., IEEE TIFS 2025).

A fresh, randomly initialised student is distilled from the suspect (teacher) encoder on a
small clean subset, with attention transfer on layer1..4 weighted by how much mutual
information each teacher block shares with the teacher's final representation.

The paper's setting (4% of CIFAR-10 = 2,000 images, 1000 epochs):
    python -u MIMIC.py --lr 1e-2 --batch_size 128 --epochs 1000 --pretraining_dataset cifar10 \
        --teacher output/cifar10/badencoder_gtsrb/model_200.pth --ratio 0.04 \
        --results_dir output/cifar10/mimic_gtsrb
Add --protocol authors for every option as the authors' code has it, MI estimated on the
untrained student included (docs/fidelity.md).
The same global batch on 4 GPUs (--batch_size is per process; the MI estimation is shared out
block by block among the processes):
    torchrun --nproc_per_node=4 MIMIC.py --batch_size 32 --sync_bn ...the same flags...

Reads   the teacher checkpoint, the first ratio*N images of <data_dir>/<pretraining_dataset>/train.npz
        (STL-10: of train_unlabeled.npz for the distillation, of train.npz for the MI estimation)
Writes  <results_dir>/args.json, mi.json (MI per block, its history and the weights), log.jsonl,
        log.csv, checkpoint.pth, model_<epoch>.pth, results.json
"""
from dataclasses import fields

import torch

from datasets import (NORMALIZATION, encoder_normalization, load_split, normalization_record, pretraining_split,
                      split_input)
from datasets.loader import ViewLoader, clean_subset, to_input
from models import BLOCKS, build_encoder, encoder_checkpoint, estimate_mi, load_encoder, mi_to_weights, mi_warnings
from models.distill import LR_SCHEDULES, distill_epoch, epoch_lr, set_lr
from models.encoder import INITS
from models.health import PROBE_IMAGES, check_finite_encoder
from models.mine import (AUTHORS as MI_AUTHORS, EVAL_PERMUTATIONS, EVALUATIONS, FIRST_LAYERS, ORDERS, SCHEDULES,
                         STANDARDIZATIONS, MISettings, holdout_split)
from utils.cli import (AUTHORS_RUN, MAX_HIDDEN, StageParser, add_clean_subset, add_distributed_args, add_init_flag,
                       add_pretraining_split, add_protocol, add_run_args, int_in, learning_rate, nonnegative_float,
                       positive_float, positive_int, run_cli, unit_interval)
from utils.device import fast_paths, place
from utils.distributed import distribute, gather_objects, get_rank, get_world_size, global_batch, is_main
from utils.errors import UserError
from utils.fingerprint import encoder_usage, stage_fingerprint
from utils.logs import progress
from utils.records import MI, MIRecord
from utils.stage import TrainingRun, check_batchnorm_batch, start_run

# --protocol authors: this stage as the authors' code runs it (docs/fidelity.md, first table).
# The estimator's part is models.mine.AUTHORS, flag by flag (--mi_<field>; the seed is --seed's).
AUTHORS = {
    "init": "torchvision",              # the fresh student: torchvision's resnet18() init
    "pretraining_split": "auto",        # STL-10: distil on train_unlabeled, MI on train
    "augment": "torchvision",           # the per-image PIL pipeline of their code
    **AUTHORS_RUN,                      # float32, torch's default layout, deterministic cuDNN
    "mi_model": "student",              # MI measured on the untrained student
    **{f"mi_{f.name}": getattr(MI_AUTHORS, f.name) for f in fields(MISettings) if f.name != "seed"},
}


def get_parser():
    parser = StageParser(description="Stage 2: purify a suspect encoder with MIMIC.")
    data = parser.add_argument_group("data")
    data.add_argument("--teacher", required=True, help="suspect (e.g. backdoored) encoder checkpoint")
    add_clean_subset(data)
    add_pretraining_split(data)
    data.add_argument("--results_dir", default="output/cifar10/mimic",
                      help="where checkpoints and logs go (default: output/cifar10/mimic)")
    optim = parser.add_argument_group("distillation")
    optim.add_argument("--lr", type=learning_rate, default=1e-2, help="Adam learning rate (default: 1e-2)")
    optim.add_argument("--weight_decay", type=nonnegative_float, default=1e-6, help="Adam weight decay (default: 1e-6)")
    optim.add_argument("--batch_size", type=positive_int, default=128,
                       help="images per step in each process (under torchrun with N processes a step "
                            "sees N x this many); the MI estimator's batch is that global batch "
                            "(default: 128)")
    optim.add_argument("--epochs", type=positive_int, default=1000, help="distillation epochs (default: 1000)")
    optim.add_argument("--lr_schedule", default="constant", choices=LR_SCHEDULES,
                       help="the student's learning rate over the epochs: --lr throughout (constant, the authors'), "
                            "or annealed to 0 along a half cosine (cosine), which lets a short run on a small "
                            "subset settle (default: constant)")
    optim.add_argument("--temperature", type=positive_float, default=0.5, help="NT-Xent temperature (default: 0.5)")
    add_init_flag(optim, "the fresh student's backbone", INITS)
    for i, block in enumerate(BLOCKS, 1):
        optim.add_argument(f"--at_base_{block}", f"--opt{i}", dest=f"at_base_{block}", type=nonnegative_float,
                           default=1000.0, help=f"base weight of attention transfer on {block}, before the "
                                                f"MI share is added; --opt{i} in the authors' code (default: 1000)")
    optim.add_argument("--clone_weight", "--opt5", dest="clone_weight", type=nonnegative_float, default=1.0,
                       help="weight of the feature-cloning loss; --opt5 in the authors' code (default: 1)")
    optim.add_argument("--augment", default="batched", choices=["batched", "torchvision"],
                       help="augmentation path, as in train_clean_encoder.py (default: batched)")
    mi = parser.add_argument_group("mutual information (attention weights)")
    mi.add_argument("--attention", default="mi", choices=["mi", "uniform"],
                    help="mi: weights from estimated MI; uniform: equal shares, no estimation "
                         "(an ablation) (default: mi)")
    mi.add_argument("--mi_model", default="teacher", choices=["teacher", "student"],
                    help="network whose blocks MI is measured on; 'student' (the untrained student) "
                         "reproduces the authors' code (default: teacher, as in the paper)")
    mi.add_argument("--mi_scale", type=nonnegative_float, default=10000.0,
                    help="weight shared among blocks in proportion to MI (default: 10000)")
    d = MISettings()            # the estimator's defaults, defined once in models.mine
    mi.add_argument("--mi_epochs", type=positive_int, default=d.epochs,
                    help=f"estimator epochs per block (default: {d.epochs})")
    mi.add_argument("--mi_lr", type=learning_rate, default=d.lr, help=f"estimator Adam learning rate (default: {d.lr:g})")
    mi.add_argument("--mi_weight_decay", type=nonnegative_float, default=d.weight_decay,
                    help=f"estimator Adam weight decay (default: {d.weight_decay:g})")
    mi.add_argument("--mi_hidden", type=int_in(1, MAX_HIDDEN), default=d.hidden,
                    help=f"estimator hidden width (default: {d.hidden})")
    mi.add_argument("--mi_standardize", default=d.standardize, choices=STANDARDIZATIONS,
                    help="inputs of the statistics network: feature = each feature standardised over the "
                         "subset (MI is unchanged by it, the estimator converges), global = one scale for "
                         f"all features, none = raw block outputs as the authors (default: {d.standardize})")
    mi.add_argument("--mi_evaluation", default=d.evaluation, choices=EVALUATIONS,
                    help="after each estimator epoch, the DV bound over all evaluated images, averaged "
                         f"over {EVAL_PERMUTATIONS} fixed permutations (global), or per batch of --batch_size "
                         f"in data order, each clipped at 0 and averaged, as the authors (per_batch) "
                         f"(default: {d.evaluation})")
    mi.add_argument("--mi_holdout", type=unit_interval, default=d.holdout,
                    help="fraction of the MI images the statistics networks never train on; the bound is "
                         "evaluated on them, so memorised pairs do not count as information; 0 trains and "
                         f"evaluates on all, as the authors (default: {d.holdout:g})")
    mi.add_argument("--mi_schedule", default=d.schedule, choices=SCHEDULES,
                    help="estimator learning rate: annealed to 0 over --mi_epochs (cosine), so the last "
                         f"epochs measure a settled network, or constant, as the authors (default: {d.schedule})")
    mi.add_argument("--mi_order", default=d.order, choices=ORDERS,
                    help="estimator training batches: reshuffled every epoch with the incomplete last batch "
                         "dropped (shuffled), or in the data's order with the last partial batch kept, as the "
                         f"authors (ordered) (default: {d.order})")
    mi.add_argument("--mi_first_layer", default=d.first_layer, choices=FIRST_LAYERS,
                    help="statistics network's first layer: two Linears on the block output and on z, each "
                         "initialised over its own fan-in (split), or one Linear on their concatenation, as "
                         f"the authors (joint) (default: {d.first_layer})")
    mi.add_argument("--mi_average_last", type=positive_int, default=d.average_last,
                    help=f"MI = mean bound of this many last estimator epochs (default: {d.average_last})")
    add_distributed_args(add_run_args(parser, seed=100, save_freq=100))
    return add_protocol(parser, AUTHORS)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the teacher and the split of the
    clean subset, plus the labelled train split where MI is estimated on it (STL-10) or it gives
    the normalisation (a dataset without published statistics)."""
    usage = encoder_usage(args.teacher, args.pretraining_dataset)
    split = pretraining_split(usage, args.pretraining_split)
    files = {"teacher": args.teacher, **split_input(args.data_dir, usage, split)}
    if split != "train" or usage not in NORMALIZATION:
        files.update(split_input(args.data_dir, usage, "train"))
    return files


@torch.no_grad()
def block_activations(model, images, mean, std, device, batch_size):
    """One forward pass over the images: flattened layer1..4 outputs and normalised features."""
    model.eval()
    blocks, feats = [[] for _ in BLOCKS], []
    for s in progress(range(0, len(images), batch_size), desc="activations"):
        feature, _, acts = model(to_input(images[s:s + batch_size], mean, std, device), return_blocks=True)
        feats.append(feature)
        for store, a in zip(blocks, acts):
            store.append(a.flatten(1))
    return [torch.cat(b) for b in blocks], torch.cat(feats)


def mi_settings(args):
    """The estimator's options from the --mi_* flags (and --seed)."""
    return MISettings(epochs=args.mi_epochs, lr=args.mi_lr, weight_decay=args.mi_weight_decay, hidden=args.mi_hidden,
                      average_last=args.mi_average_last, standardize=args.mi_standardize,
                      evaluation=args.mi_evaluation, holdout=args.mi_holdout, schedule=args.mi_schedule,
                      order=args.mi_order, first_layer=args.mi_first_layer, seed=args.seed)


def locate_knowledge(model, images, mean, std, device, batch_size, settings):
    """MI (nats) between each block's output and the final representation: {"mi": [...], "history": [...]}.

    batch_size is the estimator's batch: the global batch, N x --batch_size, as in one process.
    Under torchrun process r estimates blocks r, r+N, ... and the values are exchanged, so every
    process ends with the same list (each block's estimator is seeded by settings.seed alone).
    """
    blocks, z = block_activations(model, images, mean, std, device, batch_size)
    mine = {}
    for i in range(get_rank(), len(BLOCKS), get_world_size()):
        mine[i] = estimate_mi(blocks[i], z, settings, batch_size, desc=f"MI {BLOCKS[i]}", return_report=True)
    found = {i: result for part in gather_objects(mine) for i, result in part.items()}
    mi, history, reports = (list(column) for column in zip(*(found[i] for i in range(len(BLOCKS)))))
    for name, a, value, report in zip(BLOCKS, blocks, mi, reports):
        print(f"MI({name}; z) = {value:.4g} nats  (dim {a.shape[1]}; {report['reason']})")
    for line in mi_warnings(BLOCKS, mi, reports):
        print(f"warning: {line}")
    return {"mi": mi, "history": history, "convergence": reports}


def main(args):
    check_batchnorm_batch(args.batch_size)
    out_dir, device = start_run(args, args.resume, distributed=True, inputs=input_files(args))
    fingerprint = stage_fingerprint("mimic", args, input_files)
    teacher, teacher_ckpt = load_encoder(args.teacher)
    args.pretraining_dataset, mean, std = encoder_normalization(teacher_ckpt, args.teacher, args.pretraining_dataset,
                                                                args.data_dir)
    split = pretraining_split(args.pretraining_dataset, args.pretraining_split)
    x, _ = load_split(args.data_dir, args.pretraining_dataset, split)
    subset = clean_subset(x, args.ratio, args.batch_size)
    mi_subset = subset              # the authors estimate MI on the labelled split (without labels)
    if split != "train":
        train_x, _ = load_split(args.data_dir, args.pretraining_dataset, "train")
        mi_subset = train_x[:int(args.ratio * len(train_x))]
    if args.attention == "mi":
        try:
            holdout_split(len(mi_subset), args.mi_holdout, args.seed)
        except ValueError as err:
            raise UserError(f"--mi_holdout: {err}: the MI images are {len(mi_subset)} ({args.ratio} of "
                            f"{args.pretraining_dataset}); raise --ratio or pass --mi_holdout 0") from None

    amp, channels_last = fast_paths(args, device)
    teacher = place(teacher, device, channels_last).eval().requires_grad_(False)
    probe = to_input(subset[:PROBE_IMAGES], mean, std, device)      # the health checks' images
    check_finite_encoder(teacher, probe, "MIMIC", source=args.teacher)
    student = place(build_encoder(teacher.config, args.init), device, channels_last)     # fresh: inherits nothing
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    meta = {"stage": "mimic", "usage": args.pretraining_dataset,
            "normalization": normalization_record(args.pretraining_dataset, mean, std)}

    def checkpoint():
        return encoder_checkpoint(student, optimizer=optimizer.state_dict(), args=vars(args), **meta)

    run = TrainingRun(out_dir, args, meta["stage"],
                      guard=lambda: check_finite_encoder(student, probe, meta["stage"]),
                      fingerprint=fingerprint)
    start, ckpt = run.resume(student, optimizer)
    base = [getattr(args, f"at_base_{block}") for block in BLOCKS]
    if ckpt is not None:
        located = {"mi": ckpt["mi"], "history": [], "convergence": ckpt.get("mi_convergence")}
    elif args.attention == "uniform":
        located = {"mi": [0.0] * len(BLOCKS), "history": [], "convergence": None}
    else:
        print(f"clean subset: {len(subset)} images of {split}; locating knowledge in the {args.mi_model} "
              f"on {len(mi_subset)} images")
        located = locate_knowledge(teacher if args.mi_model == "teacher" else student, mi_subset, mean, std,
                                   device, global_batch(args.batch_size)[0], mi_settings(args))
    weights = mi_to_weights(located["mi"], base, args.mi_scale)
    record = MIRecord(blocks=list(BLOCKS), mi=located["mi"], weights=weights, mi_model=args.mi_model,
                      history=located["history"], convergence=located["convergence"])
    if ckpt is None and is_main():
        record.save(out_dir / MI)
    meta.update(mi=located["mi"], mi_convergence=located["convergence"], attention_weights=weights)
    print("block    MI (nats)   AT weight")
    for name, m, w in zip(BLOCKS, located["mi"], weights):
        print(f"{name:8s} {m:9.4g}   {w:9.1f}")

    loader = ViewLoader(subset, args.batch_size, mean, std, device, args.augment, args.num_workers, args.seed)
    trained = distribute(student, device, args.sync_bn)     # DDP under torchrun, else the student itself
    for epoch in range(start + 1, args.epochs + 1):
        loader.set_epoch(epoch)
        if args.lr_schedule != "constant":      # the constant rate is Adam's own, untouched
            set_lr(optimizer, epoch_lr(args.lr, epoch, args.epochs, args.lr_schedule))
        row = distill_epoch(trained, teacher, loader, optimizer, weights, args.clone_weight, args.temperature,
                            epoch, out_dir, amp)
        run.log_epoch(epoch, row)
        run.save(epoch, checkpoint())
    verdicts = record.verdicts()
    encoder = run.finish(checkpoint(), clean_images=len(subset), mi=dict(zip(BLOCKS, located["mi"])),
                         attention_weights=dict(zip(BLOCKS, weights)),
                         mi_converged=dict(zip(BLOCKS, verdicts)) if located["convergence"] else None)
    print(f"purified encoder: {encoder}")


if __name__ == "__main__":
    run_cli(main, get_parser())
