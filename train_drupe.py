"""Stage 1 (DRUPE): plant a distribution-preserving backdoor in a clean encoder (Tao et al.,
"Distribution Preserving Backdoor Attack in Self-supervised Learning", IEEE S&P 2024).

DRUPE's setting for a CIFAR-10 encoder (GTSRB target "priority road", 120 epochs on 10,000 random
shadow images, SGD lr 0.05):
    python train_drupe.py --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --pretraining_dataset cifar10 --downstreamTask gtsrb \
        --pretrained_encoder output/cifar10/clean_encoder/model_1000.pth --results_dir output/cifar10/drupe_gtsrb
--reference_file defaults to the task's three released DRUPE images (reference/drupe/gtsrb_l12_n3.npz).
The objective, its phases and the flags: docs/drupe.md; how this differs from DRUPE's code:
docs/fidelity.md. A shortened run scales --warm_up_end, --stage_1_end, --fix_end and --best_after
with --epochs.

Reads   the clean encoder, <data_dir>/<shadow_dataset>/train.npz (--shadow_size random images of it),
        the trigger and the reference file (two or more images of the target class)
Writes  <results_dir>/args.json, log.jsonl, log.csv, checkpoint.pth, model_<epoch>.pth (every
        --save_freq epochs and the last), model_best.pth (DRUPE's best.pth) and results.json, whose
        `encoder` is the stage's output (--output). Only the backbone f is trained; the head g is
        carried over unchanged.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from datasets import UNLABELED_SHADOW_IMAGES, encoder_normalization, normalization_record
from datasets.attack import (AttackData, add_attack_data, add_attack_optimisation, attack_stage_inputs,
                             load_reference_and_trigger, shadow_images)
from datasets.augment import BatchAugment
from datasets.loader import augment_copies, index_batches, to_input
from models import attack_copy, encoder_checkpoint, freeze_batchnorm, load_encoder
from models.drupe import (ATTACK_LOSSES, BEST_MEASURES, TERMS, BestTracker, CostSchedule, DrupePhases, drupe_terms,
                          epoch_loss)
from models.health import PROBE_IMAGES, check_finite_encoder
from paper import DRUPE_TASKS
from utils.cli import (AUTHORS_RUN, MAX_COPIES, StageParser, add_protocol, add_run_args, float_in, int_at_least,
                       int_in, nonnegative_int, positive_int, run_cli)
from utils.device import autocast, fast_paths, place
from utils.errors import UserError
from utils.files import save_checkpoint
from utils.fingerprint import encoder_usage, stage_fingerprint
from utils.logs import check_finite, progress
from utils.stage import TrainingRun, start_run

# --protocol authors: this stage as DRUPE's code runs it (docs/fidelity.md). Its quirks are the
# defaults already; the table pins them, and the shared run flags, to the authors' values.
AUTHORS = {
    "pretraining_split": "auto",        # STL-10: random images among the first 50,000 unlabeled ones
    "reference_copies": None,           # --batch_size augmented copies of each reference per step
    "attack_loss": "closest",
    "sim_b2b": "scaled_mean",
    "best_measure": "carried",
    **AUTHORS_RUN,                      # float32, torch's default layout, deterministic cuDNN
}
SHADOW_SIZE = 10_000                    # the authors' 20% of CIFAR-10's 50,000 training images
BEST = "model_best.pth"                 # DRUPE's best.pth


def get_parser():
    parser = StageParser(description="Stage 1: backdoor a clean encoder with DRUPE.")
    data = add_attack_data(parser, "drupe", DRUPE_TASKS, "DRUPE's released three images",
                           references="two or more reference inputs")
    data.add_argument("--shadow_size", type=positive_int, default=SHADOW_SIZE,
                      help="shadow images drawn at random (numpy's RandomState(--seed).choice, without "
                           "replacement, as the authors) from the shadow split; a split that holds fewer is "
                           f"used whole, with a message (default: {SHADOW_SIZE})")
    optim = add_attack_optimisation(parser, lr="0.05", epochs=120, terms=("loss_1", "loss_2"))
    optim.add_argument("--batch_size", type=int_at_least(2), default=256,
                       help="shadow images per step; at least 2, for the spread of the clean embeddings; the "
                            "incomplete last batch is dropped, as the authors (default: 256)")
    optim.add_argument("--reference_copies", type=int_in(1, MAX_COPIES), default=None,
                       help="augmented copies of each reference input per step in loss_1 (default: "
                            "--batch_size, as the authors; fewer make a step cheaper)")
    optim.add_argument("--projections", type=positive_int, default=50,
                       help="random directions of each sliced Wasserstein distance, as POT's default that "
                            "the authors use (default: 50)")
    phases = parser.add_argument_group(
        "schedule", "epochs (1-based) at which the objective changes; the defaults suit 120 epochs: scale all "
                    "four with --epochs for a shorter run")
    phases.add_argument("--warm_up_end", type=nonnegative_int, default=1,
                        help="last epoch of the warm-up, which trains without the attack term (default: 1)")
    phases.add_argument("--stage_1_end", type=nonnegative_int, default=4,
                        help="last epoch whose objective weighs std_refs by a fixed 2; the adaptive costs "
                             "come after it (default: 4)")
    phases.add_argument("--fix_end", type=nonnegative_int, default=20,
                        help="the costs keep their initial values up to this epoch and adapt after each later "
                             "one (default: 20)")
    phases.add_argument("--best_after", type=nonnegative_int, default=24,
                        help=f"{BEST} is kept only after this epoch (default: 24)")
    phases.add_argument("--l0_threshold", type=float_in(-1, 1, name="cosine"), default=-0.96,
                        help="an epoch counts as a success, which raises the costs of spreading the triggered "
                             "embeddings, only when its mean loss_0 is below this (and loss_1, loss_2 below "
                             "-0.9); DRUPE's code: -0.96 for CIFAR-10 and STL-10 encoders, -0.91 for ImageNet "
                             "ones. Lower it where the target class is a tight cluster (default: -0.96)")
    quirks = parser.add_argument_group("the authors' code's quirks (docs/fidelity.md)")
    quirks.add_argument("--attack_loss", default="closest", choices=ATTACK_LOSSES,
                        help="loss_0 pulls each triggered image to its closest reference (closest, the authors') "
                             "or to all references equally (mean, BadEncoder's average) (default: closest)")
    quirks.add_argument("--sim_b2b", default="scaled_mean", choices=("scaled_mean", "off_diagonal"),
                        help="similarity among triggered embeddings: the authors' mean of the whole cosine matrix "
                             "times 1 - 1/B (scaled_mean), or the mean over pairs i != j that it stands for "
                             "(off_diagonal) (default: scaled_mean)")
    quirks.add_argument("--best_measure", default="carried", choices=BEST_MEASURES,
                        help=f"which epochs {BEST} compares: every epoch after --best_after by the last "
                             "qualifying epoch's SWD, which starts at 0 (carried, the authors'), or only the "
                             "qualifying epochs by their own SWD (own) (default: carried)")
    quirks.add_argument("--output", default="last", choices=("last", "best"),
                        help=f"the encoder results.json names as the stage's output: model_<epochs>.pth (last) "
                             f"or {BEST} (best; the last epoch's when no epoch qualified); the authors' code "
                             "names none and evaluates its epoch checkpoints (default: last)")
    add_run_args(parser, seed=100, save_freq=10)
    return add_protocol(parser, AUTHORS)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the clean encoder, the shadow
    split, the trigger and the reference file (and the train split that gives the normalisation of
    a dataset without published statistics)."""
    return attack_stage_inputs(args, encoder_usage(args.pretrained_encoder, args.pretraining_dataset), DRUPE_TASKS)


def phases_of(args):
    """The schedule's DrupePhases from the four flags, or a one-line error."""
    try:
        return DrupePhases(args.warm_up_end, args.stage_1_end, args.fix_end)
    except ValueError:
        raise UserError(f"the schedule needs --warm_up_end <= --stage_1_end and --warm_up_end <= --fix_end; got "
                        f"--warm_up_end {args.warm_up_end}, --stage_1_end {args.stage_1_end}, --fix_end "
                        f"{args.fix_end}") from None


def sample_shadow(x, size, seed):
    """`size` images drawn at random without replacement, as the authors' np.random.choice after
    np.random.seed(seed); all of x when it holds no more than that."""
    if len(x) <= size:
        return x
    return x[np.random.RandomState(seed).choice(len(x), size, replace=False)]


@dataclass(frozen=True)
class Objective:
    """How a step turns embeddings into DRUPE's loss: the flags of drupe_terms and epoch_loss."""
    phases: DrupePhases
    lambdas: tuple                  # (lambda1, lambda2)
    copies: int                     # augmented copies of each reference input per step
    projections: int
    off_diagonal: bool
    attack: str


def train_one_epoch(backbone, data, augment, optimizer, objective, costs, batch_size, seed, epoch, out_dir,
                    amp=False):
    """One epoch over the shuffled shadow data (incomplete last batch dropped). backbone: the
    backdoored encoder's f; augment: the reference inputs' augmentation; costs: the CostSchedule in
    force this epoch. Returns (the epoch's mean loss and terms, the last batch's terms), floats."""
    backbone.train()
    freeze_batchnorm(backbone)
    device = data.reference.device
    sums, steps, last = dict.fromkeys(("loss", *TERMS), 0.0), 0, {}
    bar = progress(index_batches(len(data.shadow), batch_size, seed, epoch), desc=f"epoch {epoch}")
    ref = to_input(data.reference, data.mean, data.std, device)      # RxCxHxW
    for step, idx in enumerate(bar):
        x = to_input(data.shadow[idx], data.mean, data.std, device)  # BxCxHxW
        x_t = to_input(data.triggered[idx], data.mean, data.std, device)
        ref_aug = augment_copies(augment, data.reference, objective.copies)   # (R*copies)xCxHxW
        b, r = len(x), len(ref)
        # BatchNorm is frozen, so one pass over the concatenation equals four separate passes.
        # Only the backbone runs: the head g is not trained and its statistics must not move.
        with autocast(x.device, amp):
            feats = backbone(torch.cat([x_t, x, ref, ref_aug]))
        h_trig, h_x, h_ref, h_ref_aug = feats.float().split([b, b, r, len(ref_aug)])
        terms = drupe_terms(h_trig, h_x, data.shadow_clean[idx.to(device)], h_ref,
                            h_ref_aug.view(r, objective.copies, -1), data.reference_clean,
                            projections=objective.projections, off_diagonal=objective.off_diagonal,
                            attack=objective.attack)
        loss = epoch_loss(terms, epoch, costs.cost, costs.cost_1, objective.phases, *objective.lambdas)
        check_finite(loss.item(), epoch, step, out_dir)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        for k, v in last.items():
            sums[k] += v
        steps += 1
        bar.set_postfix(loss=f"{last['loss']:.4f}", loss_0=f"{last['loss_0']:.4f}")
    return {k: s / max(steps, 1) for k, s in sums.items()}, last


class DrupeRun(TrainingRun):
    """TrainingRun whose output encoder (results.json's `encoder`) is model_best.pth under --output
    best once an epoch has qualified for it, else the last epoch's model file."""

    def __init__(self, *args, output="last", **kwargs):
        super().__init__(*args, **kwargs)
        self.output = output

    @property
    def encoder_path(self):
        best = self.out_dir / BEST
        if self.output == "best" and best.exists():
            return best
        return super().encoder_path


def main(args):
    phases = phases_of(args)
    if args.output == "best" and args.epochs <= args.best_after:
        raise UserError(f"--output best: no epoch comes after --best_after {args.best_after} in --epochs "
                        f"{args.epochs}; lower --best_after or use --output last")
    out_dir, device = start_run(args, args.resume, inputs=input_files(args))
    fingerprint = stage_fingerprint("drupe", args, input_files)
    clean, clean_ckpt = load_encoder(args.pretrained_encoder)
    args.pretraining_dataset, mean, std = encoder_normalization(clean_ckpt, args.pretrained_encoder,
                                                                args.pretraining_dataset, args.data_dir)
    shadow = args.shadow_dataset or args.pretraining_dataset
    x_all, split = shadow_images(args.data_dir, shadow, args.pretraining_split, UNLABELED_SHADOW_IMAGES)
    x = sample_shadow(x_all, args.shadow_size, args.seed)
    if len(x_all) < args.shadow_size:
        print(f"shadow data: {shadow} {split} holds {len(x_all)} images, fewer than --shadow_size "
              f"{args.shadow_size}: training on all of them")
    if len(x) < args.batch_size:
        raise UserError(f"the {len(x)} shadow images are fewer than one batch of --batch_size {args.batch_size}, "
                        f"and the incomplete last batch is dropped: lower --batch_size")
    ref_x, target, t, tm = load_reference_and_trigger(args, DRUPE_TASKS, x.shape[1:])
    if len(ref_x) < 2:
        raise UserError(f"the reference file {args.reference_file} holds {len(ref_x)} reference input; DRUPE needs "
                        f"at least 2 (its std_refs term is a spread over the references): pass a file with "
                        f"several images of the target class, such as DRUPE's three")

    amp, channels_last = fast_paths(args, device)
    clean = place(clean, device, channels_last).eval().requires_grad_(False)
    probe = to_input(x[:PROBE_IMAGES], mean, std, device)      # the health checks' images: shadow data
    check_finite_encoder(clean, probe, "DRUPE", source=args.pretrained_encoder)
    model, optimizer = attack_copy(clean, args.lr, args.momentum, args.weight_decay)
    meta = {"stage": "drupe", "usage": args.pretraining_dataset, "target_label": target,
            "normalization": normalization_record(args.pretraining_dataset, mean, std)}
    costs = CostSchedule(l0_threshold=args.l0_threshold)
    best = BestTracker(after=args.best_after, rule=args.best_measure)

    def checkpoint():
        return encoder_checkpoint(model, optimizer=optimizer.state_dict(), args=vars(args),
                                  drupe={"costs": asdict(costs), "best": asdict(best)}, **meta)

    def guard():
        check_finite_encoder(model, probe, "DRUPE")

    run = DrupeRun(out_dir, args, meta["stage"], guard=guard, fingerprint=fingerprint, output=args.output)
    start, ckpt = run.resume(model, optimizer)
    if ckpt is not None:
        try:
            costs, best = CostSchedule(**ckpt["drupe"]["costs"]), BestTracker(**ckpt["drupe"]["best"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--resume: {out_dir / 'checkpoint.pth'} holds no DRUPE cost schedule and best-epoch "
                            f"state, so the run cannot continue exactly; start a new --results_dir") from None

    data = AttackData.build(clean, x, t, tm, ref_x, mean, std, device)
    augment = BatchAugment(x.shape[1], mean, std, crop=False)
    objective = Objective(phases, (args.lambda1, args.lambda2), args.reference_copies or args.batch_size,
                          args.projections, args.sim_b2b == "off_diagonal", args.attack_loss)
    print(f"shadow data: {len(x)} images of {shadow}; {len(ref_x)} reference inputs of label {target}")
    for epoch in range(start + 1, args.epochs + 1):
        means, last = train_one_epoch(model.f, data, augment, optimizer, objective, costs, args.batch_size,
                                      args.seed, epoch, out_dir, amp)
        # The published code judges an epoch by its mean losses but by its last batch's sim_b2b, and
        # keeps best.pth by its last batch's raw SWD.
        judged = {**means, "sim_b2b": last["sim_b2b"]}
        success_1 = costs.adapts(epoch, phases) and costs.successes(judged)[1]
        best, keep = best.update(epoch, success_1, last["swd"])
        row = {**means, "sim_b2b_last": last["sim_b2b"], "swd_last": last["swd"], "cost": costs.cost,
               "cost_1": costs.cost_1, "best_epoch": best.epoch}
        costs = costs.update(judged, epoch, phases)
        run.log_epoch(epoch, row)
        if keep:
            guard()
            save_checkpoint(out_dir / BEST, {**checkpoint(), "epoch": epoch, "fingerprint": fingerprint})
        run.save(epoch, checkpoint())
    encoder = run.finish(checkpoint(), target_label=target, output=args.output, best_epoch=best.epoch,
                         shadow_images=len(x))
    print(f"backdoored encoder: {encoder}")


if __name__ == "__main__":
    run_cli(main, get_parser())
