"""Detection: is an encoder backdoored? DECREE (Feng et al., CVPR 2023).

DECREE searches for the smallest trigger (a mask and a pattern) that makes the frozen encoder
embed every triggered shadow image alike (mean pairwise cosine similarity above 0.99). A
backdoored encoder has such a trigger of its backdoor's size; a clean one needs a mask over much
of the image. The score, PL1, is the mask's L1 norm as a share of the image (0.1 for a 10x10
square on 32x32 images); the verdict is "backdoored" below --threshold (docs/decree.md).

The authors' setting for a CIFAR-10 encoder (shadow data: the first 10% of each class of CIFAR-10's
test split; batch 128, Adam lr 0.5, at most 1,000 epochs):
    python detect.py --encoder output/cifar10/badencoder_gtsrb/model_200.pth --pretraining_dataset cifar10 \
        --results_dir output/cifar10/decree_badencoder_gtsrb
Add --protocol authors for every option as DECREE's code has it (docs/fidelity.md).

Reads   the encoder checkpoint, <data_dir>/<pretraining_dataset>/test.npz (shadow data)
Writes  <results_dir>/args.json, log.jsonl and log.csv (one row per epoch), checkpoint.pth (the
        search's state after each epoch, for --resume), trigger.png (mask, pattern and mask x pattern
        side by side) and trigger.npz (the best mask and pattern) when a trigger was found, and
        results.json with the L1, PL1, verdict, epochs and seconds. --results_dir defaults to a
        folder next to the encoder: <encoder folder>/decree.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import NORMALIZATION, encoder_normalization, load_split, split_input
from datasets.augment import normalize
from datasets.loader import index_batches, to_input
from models import load_encoder
from models.decree import (NO_TRIGGER_L1, SearchState, Settings, Trigger, lr_at, pl1, search_epoch, self_cosine,
                           verdict)
from models.distill import set_lr
from models.health import PROBE_IMAGES, check_finite_encoder
from utils.cli import (AUTHORS_RUN, StageParser, add_protocol, add_run_args, float_in, int_at_least, learning_rate,
                       positive_float, positive_int, run_cli)
from utils.device import autocast, fast_paths, place
from utils.errors import UserError
from utils.files import atomic_write, save_checkpoint
from utils.fingerprint import encoder_usage, stage_fingerprint
from utils.records import DETECTED_TRIGGER, DETECTED_TRIGGER_IMAGE, RESULTS, Results
from utils.seeding import rng_state
from utils.stage import TrainingRun, start_run

STAGE = "decree"
# The PL1 below which an encoder is called backdoored: the demo's clean encoder scored 0.159 +- 0.019
# (mean +- std over 8 search seeds, lowest 0.142); mean - 1.5 std = 0.131 (docs/decree.md, "The threshold").
THRESHOLD = 0.13
SHADOW_SHARE = 0.1          # the authors' shadow data: 10% of each class of the test split
# Above this mean pairwise cosine of the clean shadow images' embeddings, an encoder embeds images
# alike before any trigger, so a tiny mask passes the 0.99 test and the score says nothing about a
# backdoor. At demo scale: trained encoders 0.58-0.77, fresh random ones 0.97-0.99 (docs/decree.md).
ALIKE_COS = 0.9
TRIGGER_FILES = (DETECTED_TRIGGER_IMAGE, DETECTED_TRIGGER)

# --protocol authors: this stage as DECREE's code runs it (docs/fidelity.md, first table).
AUTHORS = {
    **AUTHORS_RUN,                      # float32, torch's default layout, deterministic cuDNN
}


def get_parser():
    parser = StageParser(description="Detection: search for a small trigger that collapses the encoder's "
                                     "embeddings (DECREE).")
    data = parser.add_argument_group("data")
    data.add_argument("--encoder", "--encoder_path", dest="encoder", required=True,
                      help="encoder checkpoint to examine (ours or BadEncoder's); --encoder_path in DECREE's code")
    data.add_argument("--encoder_usage_info", "--pretraining_dataset", "--encoder_usage",
                      dest="pretraining_dataset", default=None,
                      help="dataset the encoder was pre-trained on: its test split gives the shadow data, and it "
                           "names the normalisation unless the encoder carries its own (default: the encoder's "
                           "own, else cifar10)")
    data.add_argument("--shadow_dataset", default=None,
                      help="dataset under --data_dir whose test split gives the shadow data (default: the "
                           "pre-training dataset)")
    data.add_argument("--shadow_per_class", type=positive_int, default=None,
                      help="shadow images per class: the first this many of each class of the test split, in "
                           "file order; fewer make the search cheaper (default: 10%% of each class, rounded up, "
                           "as the authors: 100 for CIFAR-10, 80 for STL-10)")
    data.add_argument("--results_dir", default=None,
                      help="where logs and results go (default: <encoder folder>/decree)")
    search = parser.add_argument_group("trigger search")
    search.add_argument("--lr", type=learning_rate, default=0.5,
                        help="Adam learning rate of the mask and pattern up to the first of --lr_drop_epochs; the "
                             "authors' run script passes 0.5 (their parser's 1e-3 is never used) (default: 0.5)")
    search.add_argument("--lr_drop_epochs", type=positive_int, nargs=2, default=[30, 50], metavar=("E1", "E2"),
                        help="the rate becomes the first of --lr_drops after epoch E1 and the second after E2 "
                             "(default: 30 50)")
    search.add_argument("--lr_drops", type=learning_rate, nargs=2, default=[0.1, 0.05], metavar=("LR1", "LR2"),
                        help="learning rates after E1 and after E2, absolute values (default: 0.1 0.05)")
    search.add_argument("--batch_size", type=int_at_least(2), default=128,
                        help="shadow images per step; the similarity is measured among them (default: 128)")
    search.add_argument("--epochs", type=positive_int, default=1000,
                        help="at most this many epochs; the search stops earlier once the epoch's mean |cos| is "
                             "above --cos_threshold and the best L1 has not fallen for more than --stop_patience "
                             "steps (default: 1000)")
    search.add_argument("--cos_threshold", type=float_in(0, 1, lo_open=True, hi_open=True, name="cosine"),
                        default=Settings.cos_threshold,
                        help="a step's trigger succeeds when the mean cosine similarity of the triggered "
                             f"embeddings exceeds it; --thres in DECREE's code (default: {Settings.cos_threshold:g})")
    search.add_argument("--lambda_min", type=positive_float, default=Settings.lambda_min,
                        help="the L1 weight is divided only while at or above it; the authors use 1e-7 for 224x224 "
                             f"encoders (default: {Settings.lambda_min:g})")
    search.add_argument("--stop_patience", type=positive_int, default=Settings.stop_patience,
                        help="early stop after more than this many steps without a smaller L1; the authors use 35 "
                             f"for 224x224 encoders (default: {Settings.stop_patience})")
    detection = parser.add_argument_group("detection")
    detection.add_argument("--threshold", type=positive_float, default=THRESHOLD,
                           help="PL1 below which the encoder is called backdoored; DECREE's code has none. Ours is "
                                "1.5 standard deviations below the demo's clean encoder's mean score; measure clean "
                                f"encoders of another architecture or dataset to set it (default: {THRESHOLD:g})")
    run = add_run_args(parser, seed=100)
    run.add_argument("--resume", action="store_true",
                     help="continue the search in --results_dir from its checkpoint.pth (trigger, optimiser, "
                          "lambda, best trigger and epoch)")
    return add_protocol(parser, AUTHORS, what="every behaviour of this stage as in DECREE's code")


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the encoder and the test split of the
    shadow dataset (and the train split that gives the normalisation of a pre-training dataset
    without published statistics)."""
    usage = encoder_usage(args.encoder, args.pretraining_dataset)
    files = {"encoder": args.encoder, **split_input(args.data_dir, args.shadow_dataset or usage, "test")}
    if usage not in NORMALIZATION:
        files.update(split_input(args.data_dir, usage, "train"))
    return files


def shadow_indices(labels, per_class=None):
    """Indices, in file order, of the first `per_class` images of each class; None takes 10% of each
    class rounded up, as the authors' sampler (it keeps an image while fewer than share x class size
    of its class are kept)."""
    labels = np.asarray(labels).reshape(-1)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = math.ceil(len(members) * SHADOW_SHARE) if per_class is None else per_class
        keep.append(members[:count])
    return np.sort(np.concatenate(keep))


def settings(args):
    return Settings(cos_threshold=args.cos_threshold, lambda_min=args.lambda_min, stop_patience=args.stop_patience)


def save_trigger(out_dir, mask, pattern, scale=4, gap=8):
    """trigger.png: the mask (white = 1), the pattern and mask x pattern side by side, each
    enlarged `scale` times; trigger.npz: the mask (HxW) and pattern (HxWx3, 0-255) as float64."""
    mask, pattern = mask.double().cpu(), pattern.double().cpu()
    panels = [mask.unsqueeze(-1).expand_as(pattern) * 255, pattern, mask.unsqueeze(-1) * pattern]   # HxWx3 each
    h, w = mask.shape
    sheet = np.full((h * scale, 3 * w * scale + 2 * gap, 3), 128, dtype=np.uint8)
    for i, panel in enumerate(panels):
        big = panel.round().clamp(0, 255).to(torch.uint8).numpy().repeat(scale, 0).repeat(scale, 1)
        left = i * (w * scale + gap)
        sheet[:, left:left + w * scale] = big
    atomic_write(out_dir / TRIGGER_FILES[0], lambda tmp: Image.fromarray(sheet).save(tmp, format="PNG"))

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, mask=mask.numpy(), pattern=pattern.numpy())
    atomic_write(out_dir / TRIGGER_FILES[1], write)


def main(args):
    if args.results_dir is None:
        args.results_dir = str(Path(args.encoder).resolve().parent / STAGE)
    if args.lr_drop_epochs[0] > args.lr_drop_epochs[1]:
        raise UserError(f"--lr_drop_epochs {args.lr_drop_epochs[0]} {args.lr_drop_epochs[1]}: the second epoch "
                        f"must not come before the first")
    out_dir, device = start_run(args, args.resume, inputs=input_files(args))
    fingerprint = stage_fingerprint(STAGE, args, input_files)
    encoder, ckpt = load_encoder(args.encoder)
    args.pretraining_dataset, mean, std = encoder_normalization(ckpt, args.encoder, args.pretraining_dataset,
                                                                args.data_dir, flag="--encoder_usage_info")
    shadow_name = args.shadow_dataset or args.pretraining_dataset
    x, y = load_split(args.data_dir, shadow_name, "test")
    shadow = x[shadow_indices(y, args.shadow_per_class)]
    if len(shadow) < args.batch_size:
        per_class = args.shadow_per_class or f"{SHADOW_SHARE:.0%} of each class"
        raise UserError(f"the shadow data ({len(shadow)} images: {per_class} per class of {shadow_name}/test) "
                        f"are fewer than one batch of --batch_size {args.batch_size}: lower --batch_size or "
                        f"raise --shadow_per_class")

    amp, channels_last = fast_paths(args, device)
    encoder = place(encoder, device, channels_last).eval().requires_grad_(False)
    check_finite_encoder(encoder, to_input(shadow[:PROBE_IMAGES], mean, std, device), "DECREE", source=args.encoder)
    height, width = shadow.shape[1:3]
    trigger = Trigger(height, width, torch.Generator().manual_seed(args.seed)).to(device)
    optimizer = torch.optim.Adam(trigger.parameters(), lr=args.lr, betas=(0.5, 0.9))
    s = settings(args)
    run = TrainingRun(out_dir, args, STAGE, fingerprint=fingerprint)
    epoch, resumed = run.resume(trigger, optimizer)
    state = SearchState.from_dict(resumed["search"]) if resumed else SearchState.start(s)
    seconds = resumed["seconds"] if resumed else 0.0
    if not resumed:
        for name in TRIGGER_FILES:          # an earlier run's trigger, left by --overwrite
            (out_dir / name).unlink(missing_ok=True)
    print(f"shadow data: {len(shadow)} images of {shadow_name}/test ({height}x{width}); at most {args.epochs} "
          f"epochs of {math.ceil(len(shadow) / args.batch_size)} steps")

    images = torch.from_numpy(shadow).to(device, torch.float64)         # NxHxWx3, 0-255

    def embed(batch):
        """Bx3xHxW float64 in [0, 1] -> BxD backbone features. The encoder is frozen but not run under
        no_grad: the gradient flows through it to the trigger."""
        with autocast(device, amp):
            return encoder.f(normalize(batch, mean, std).float()).float()

    with torch.no_grad():
        clean_cos = self_cosine(torch.cat([embed(images[i:i + args.batch_size].permute(0, 3, 1, 2) / 255)
                                           for i in range(0, len(images), args.batch_size)])).item()
    print(f"mean pairwise cosine of the clean shadow images' embeddings: {clean_cos:.4f}")
    if clean_cos > ALIKE_COS:
        print(f"warning: above {ALIKE_COS}, the encoder embeds clean images alike before any trigger, so a small "
              f"mask reaches --cos_threshold whether or not there is a backdoor; its score is not evidence of one")

    while epoch < args.epochs and not state.stopped:
        epoch += 1
        began = time.time()
        lr = lr_at(epoch, args.lr, args.lr_drop_epochs, args.lr_drops)
        set_lr(optimizer, lr)
        batches = index_batches(len(images), args.batch_size, args.seed, epoch, drop_last=False)
        row = search_epoch(embed, images, batches, trigger, optimizer, state, epoch, s)
        seconds += time.time() - began
        run.log.log({"epoch": epoch, "lr": lr, **row, "seconds": round(time.time() - began, 2)},
                    prefix=f"epoch {epoch} (at most {args.epochs}): ")
        save_checkpoint(out_dir / "checkpoint.pth", {
            "stage": STAGE, "state_dict": trigger.state_dict(), "optimizer": optimizer.state_dict(),
            "search": state.to_dict(), "seconds": seconds, "args": vars(args), "epoch": epoch,
            "rng": rng_state(), "fingerprint": fingerprint})

    score = pl1(state.best_l1, height, width)
    call = verdict(score, args.threshold)
    if state.found:
        save_trigger(out_dir, state.best_mask, state.best_pattern)
    rows = run.log.read()
    Results(stage=STAGE, args=vars(args), epochs=epoch, encoder=str(Path(args.encoder).resolve()),
            final=rows[-1] if rows else {}, fingerprint=fingerprint,
            extra={"verdict": call, "l1": state.best_l1, "pl1": score, "threshold": args.threshold,
                   "clean_cos": clean_cos, "trigger_found": state.found, "best_epoch": state.best_epoch,
                   "stopped_early": state.stopped, "seconds": round(seconds, 2), "shadow_images": len(shadow),
                   "trigger_image": TRIGGER_FILES[0] if state.found else None}).save(out_dir / RESULTS)
    found = f"L1 {state.best_l1:.2f}" if state.found else f"no trigger found (L1 {NO_TRIGGER_L1:g})"
    print(f"{found}, PL1 {score:.4f} after {epoch} epochs ({seconds:.1f}s): {call} (threshold {args.threshold:g})")
    print(f"results: {out_dir / RESULTS}")


if __name__ == "__main__":
    run_cli(main, get_parser())
