"""Stage 1: plant a BadEncoder backdoor in a clean encoder (Jia et al., IEEE S&P 2022).

The paper's setting (CIFAR-10 encoder, GTSRB target "priority road", 200 epochs):
    python train_badencoder.py --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
        --reference_file reference/cifar10/priority.npz --pretraining_dataset cifar10 \
        --downstreamTask gtsrb --pretrained_encoder output/cifar10/clean_encoder/model_1000.pth \
        --results_dir output/cifar10/badencoder_gtsrb
(--reference_file may be left out: the task's released file is the default.) Add --protocol
authors for every option as BadEncoder's code has it (docs/fidelity.md).
Under torchrun (--batch_size is per process; BatchNorm is frozen, so no --sync_bn is needed):
    torchrun --nproc_per_node=4 train_badencoder.py --batch_size 64 ...the same flags...

Reads   the clean encoder, <data_dir>/<shadow_dataset>/train.npz (shadow data), the trigger
        and the reference file
Writes  <results_dir>/args.json, log.jsonl, log.csv, checkpoint.pth, model_<epoch>.pth,
        results.json. Only the backbone f is trained; the head g is carried over unchanged.
"""
import torch
import torch.nn.functional as F

from datasets import UNLABELED_SHADOW_IMAGES, encoder_normalization, normalization_record
from datasets.attack import (AttackData, add_attack_data, add_attack_optimisation, attack_stage_inputs,
                             load_reference_and_trigger, shadow_images)
from datasets.augment import BatchAugment
from datasets.loader import augment_copies, index_batches, to_input
from models import attack_copy, badencoder_loss, encoder_checkpoint, freeze_batchnorm, load_encoder
from models.health import PROBE_IMAGES, check_finite_encoder
from paper import TASKS
from utils.cli import AUTHORS_RUN, MAX_COPIES, StageParser, add_protocol, add_run_args, int_in, positive_int, run_cli
from utils.device import autocast, fast_paths, place
from utils.distributed import distribute, mean_over_ranks
from utils.errors import UserError
from utils.fingerprint import encoder_usage, stage_fingerprint
from utils.logs import check_finite, progress
from utils.stage import TrainingRun, start_run

# --protocol authors: this stage as BadEncoder's code runs it (docs/fidelity.md, first table).
AUTHORS = {
    "pretraining_split": "auto",        # STL-10: the first 50,000 unlabeled images as shadow data
    "reference_copies": None,           # --batch_size augmented copies of each reference per step
    "keep_last_batch": False,           # the incomplete last batch of shadow data dropped
    **AUTHORS_RUN,                      # float32, torch's default layout, deterministic cuDNN
}


def get_parser():
    parser = StageParser(description="Stage 1: backdoor a clean encoder with BadEncoder.")
    add_attack_data(parser, "badencoder", TASKS, "the authors' released one")
    optim = add_attack_optimisation(parser, lr="1e-3", epochs=200, terms=("loss1", "loss2"))
    optim.add_argument("--batch_size", type=positive_int, default=256,
                       help="shadow images per step in each process; under torchrun with N processes a "
                            "step sees N x this many (default: 256)")
    optim.add_argument("--reference_copies", type=int_in(1, MAX_COPIES), default=None,
                       help="augmented copies of each reference input per step in loss1 (default: "
                            "--batch_size, as the authors; 1 = one copy per step)")
    optim.add_argument("--keep_last_batch", action="store_true",
                       help="also train on the incomplete last batch of shadow data, which the authors "
                            "drop (default: off)")
    add_run_args(parser, seed=100, save_freq=50)
    return add_protocol(parser, AUTHORS)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the clean encoder, the shadow
    split, the trigger and the reference file (and the train split that gives the normalisation of
    a dataset without published statistics)."""
    return attack_stage_inputs(args, encoder_usage(args.pretrained_encoder, args.pretraining_dataset), TASKS)


def train_one_epoch(backbone, data, augment, optimizer, batch_size, lambdas, seed, epoch, out_dir, amp=False,
                    copies=1, drop_last=True):
    """One epoch over the shuffled shadow data. backbone: the backdoored encoder's f (DDP-wrapped
    under torchrun); augment: the reference inputs' augmentation; lambdas: (lambda1, lambda2);
    copies: independently augmented copies of each reference input per step (loss1 averages over
    them); drop_last: skip the incomplete last batch. Returns the mean loss terms."""
    backbone.train()
    freeze_batchnorm(backbone)
    device = data.reference.device
    sums, steps = torch.zeros(4), 0
    batches = index_batches(len(data.shadow), batch_size, seed, epoch, drop_last=drop_last)
    bar = progress(batches, desc=f"epoch {epoch}")
    ref = to_input(data.reference, data.mean, data.std, device)      # RxCxHxW
    ref_clean = data.reference_clean.repeat_interleave(copies, dim=0)   # (R*copies)xD
    for step, idx in enumerate(bar):
        x = to_input(data.shadow[idx], data.mean, data.std, device)  # BxCxHxW
        x_t = to_input(data.triggered[idx], data.mean, data.std, device)
        ref_aug = augment_copies(augment, data.reference, copies)      # (R*copies)xCxHxW
        b, r = len(x), len(ref)
        # BatchNorm is frozen, so one pass over the concatenation equals four separate passes.
        # Only the backbone runs: the head g is not trained and its statistics must not move.
        with autocast(x.device, amp):
            feats = backbone(torch.cat([x_t, x, ref, ref_aug]))
        feats = F.normalize(feats.float(), dim=-1)
        f_trig, f_x, f_ref, f_ref_aug = feats.split([b, b, r, len(ref_aug)])
        losses = badencoder_loss(f_trig, f_ref, f_ref_aug, ref_clean, f_x,
                                 data.shadow_clean[idx.to(device)], *lambdas)
        values = mean_over_ranks(torch.stack(losses)).cpu()     # the global batch's, in every process
        check_finite(values[0].item(), epoch, step, out_dir)
        optimizer.zero_grad(set_to_none=True)
        losses[0].backward()
        optimizer.step()
        sums += values
        steps += 1
        bar.set_postfix(loss=f"{values[0].item():.4f}")
    return dict(zip(("loss", "loss0", "loss1", "loss2"), (s.item() / max(steps, 1) for s in sums)))


def main(args):
    out_dir, device = start_run(args, args.resume, distributed=True, inputs=input_files(args))
    fingerprint = stage_fingerprint("badencoder", args, input_files)
    clean, clean_ckpt = load_encoder(args.pretrained_encoder)
    args.pretraining_dataset, mean, std = encoder_normalization(clean_ckpt, args.pretrained_encoder,
                                                                args.pretraining_dataset, args.data_dir)
    shadow = args.shadow_dataset or args.pretraining_dataset
    x, _ = shadow_images(args.data_dir, shadow, args.pretraining_split, UNLABELED_SHADOW_IMAGES)
    if len(x) < args.batch_size and not args.keep_last_batch:
        raise UserError(f"the {len(x)} shadow images are fewer than one batch of --batch_size {args.batch_size}, "
                        f"and the incomplete last batch is dropped: lower --batch_size or pass --keep_last_batch")
    ref_x, target, t, tm = load_reference_and_trigger(args, TASKS, x.shape[1:])

    amp, channels_last = fast_paths(args, device)
    clean = place(clean, device, channels_last).eval().requires_grad_(False)
    probe = to_input(x[:PROBE_IMAGES], mean, std, device)      # the health checks' images: shadow data
    check_finite_encoder(clean, probe, "BadEncoder", source=args.pretrained_encoder)
    model, optimizer = attack_copy(clean, args.lr, args.momentum, args.weight_decay)
    meta = {"stage": "badencoder", "usage": args.pretraining_dataset, "target_label": target,
            "normalization": normalization_record(args.pretraining_dataset, mean, std)}

    def checkpoint():
        return encoder_checkpoint(model, optimizer=optimizer.state_dict(), args=vars(args), **meta)

    run = TrainingRun(out_dir, args, meta["stage"],
                      guard=lambda: check_finite_encoder(model, probe, meta["stage"]),
                      fingerprint=fingerprint)
    start, _ = run.resume(model, optimizer)

    data = AttackData.build(clean, x, t, tm, ref_x, mean, std, device)
    augment = BatchAugment(x.shape[1], mean, std, crop=False)
    print(f"shadow data: {len(x)} images of {shadow}; {len(ref_x)} reference input(s) of label {target}")
    backbone = distribute(model.f, device)      # only the backbone runs and trains
    copies = args.reference_copies or args.batch_size
    for epoch in range(start + 1, args.epochs + 1):
        row = train_one_epoch(backbone, data, augment, optimizer, args.batch_size, (args.lambda1, args.lambda2),
                              args.seed, epoch, out_dir, amp, copies, drop_last=not args.keep_last_batch)
        run.log_epoch(epoch, row)
        run.save(epoch, checkpoint())
    encoder = run.finish(checkpoint(), target_label=target)
    print(f"backdoored encoder: {encoder}")


if __name__ == "__main__":
    run_cli(main, get_parser())
