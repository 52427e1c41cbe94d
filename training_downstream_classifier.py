"""Stage 3: train a downstream classifier on a frozen encoder; report ACC and ASR.

The paper's setting (GTSRB downstream, target "priority road" = 12):
    python training_downstream_classifier.py --dataset gtsrb --reference_label 12 \
        --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz --encoder_usage_info cifar10 \
        --encoder output/cifar10/mimic_gtsrb/model_1000.pth \
        --reference_file reference/cifar10/priority.npz --nn_epochs 1000
CTRL's frequency trigger instead of a trigger file (CIFAR-10 -> CIFAR-10, target 0; docs/ctrl.md):
    python training_downstream_classifier.py --dataset cifar10 --reference_label 0 --trigger ctrl \
        --encoder output/cifar10/ctrl/model_1000.pth --nn_epochs 1000
Add --protocol authors for every option as the authors' code has it (docs/fidelity.md).

Reads   the encoder checkpoint (ours or BadEncoder's), <data_dir>/<dataset>/train.npz and test.npz,
        the trigger file (and the reference file, for the target label)
Writes  <results_dir>/args.json, log.jsonl and log.csv (per-epoch curve), results.json with ACC,
        ASR and ASR excluding target-class images, and the trigger's description. --results_dir
        defaults to a folder next to the encoder: <encoder folder>/downstream_<dataset>.
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets import NORMALIZATION, encoder_normalization, load_reference, load_split, make_trigger, split_input
from datasets.frequency import CTRL_MAGNITUDE, CTRL_WINDOW
from datasets.trigger import TRIGGER_KINDS
from datasets.loader import extract_features, index_batches
from datasets.npz import check_reference_label
from models import DownstreamClassifier, load_encoder
from models.health import check_finite_features, check_not_collapsed
from models.metrics import backdoor_metrics
from paper import TRIGGER
from utils.cli import (AUTHORS_RUN, MAX_HIDDEN, StageParser, add_protocol, add_run_args, finite_float, int_at_least,
                       int_in, learning_rate, positive_int, run_cli)
from utils.errors import UserError
from utils.fingerprint import encoder_usage, stage_fingerprint
from utils.logs import RunLog, check_finite, progress
from utils.records import RESULTS, Results
from utils.stage import start_run

# --protocol authors: this stage as the authors' code runs it (docs/fidelity.md, first table).
AUTHORS = {
    "train_order": "file",              # training features in file order every epoch
    # float32 and deterministic cuDNN; this stage has no channels-last path, so that flag is not listed
    **{k: AUTHORS_RUN[k] for k in ("amp", "cudnn_deterministic")},
}


def get_parser():
    parser = StageParser(description="Stage 3: downstream ACC and ASR of an encoder.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="gtsrb", help="downstream dataset under --data_dir (default: gtsrb)")
    data.add_argument("--encoder", required=True, help="encoder checkpoint to evaluate")
    data.add_argument("--encoder_usage_info", "--pretraining_dataset", "--encoder_usage",
                      dest="pretraining_dataset", default=None,
                      help="dataset the encoder was pre-trained on, which names its normalisation; only "
                           "needed for encoders that do not carry their own, such as BadEncoder's released "
                           "ones (default: the encoder's own, else cifar10)")
    data.add_argument("--trigger", default="patch", choices=TRIGGER_KINDS,
                      help="trigger applied to every test image for the ASR: patch = --trigger_file (BadEncoder's); "
                           "ctrl = CTRL's frequency trigger, --ctrl_magnitude at DCT coefficients (15,15) and (31,31) "
                           "of U and V in every --ctrl_window window (default: patch)")
    data.add_argument("--trigger_file", default=TRIGGER,
                      help=f"with --trigger patch: trigger stamped on every test image (default: {TRIGGER})")
    data.add_argument("--ctrl_magnitude", type=finite_float, default=CTRL_MAGNITUDE,
                      help=f"with --trigger ctrl: value added to each chosen coefficient (default: {CTRL_MAGNITUDE:g})")
    data.add_argument("--ctrl_window", type=positive_int, default=CTRL_WINDOW,
                      help=f"with --trigger ctrl: DCT window size, 32 = the whole 32x32 image (default: {CTRL_WINDOW})")
    data.add_argument("--reference_label", type=int_at_least(-1), default=-1,
                      help="attacker's target label; -1 takes it from --reference_file (default: -1)")
    data.add_argument("--reference_file", default=None,
                      help="reference inputs of the target class; only its label is used (default: none)")
    data.add_argument("--results_dir", default=None,
                      help="where logs and results go (default: <encoder folder>/downstream_<dataset>)")
    clf = parser.add_argument_group("classifier")
    clf.add_argument("--nn_epochs", "--epochs", dest="epochs", type=positive_int, default=1000,
                     help="classifier epochs (default: 1000)")
    clf.add_argument("--lr", type=learning_rate, default=1e-4, help="Adam learning rate (default: 1e-4)")
    clf.add_argument("--batch_size", type=positive_int, default=64, help="classifier batch size (default: 64)")
    clf.add_argument("--train_order", default="shuffled", choices=["shuffled", "file"],
                     help="order of the training features in each epoch: shuffled (seeded by --seed and "
                          "the epoch), or file order every epoch as the authors (default: shuffled)")
    clf.add_argument("--eval_freq", type=positive_int, default=1,
                     help="measure ACC and ASR for the logged curve every N epochs, and always at the last; "
                          "the final numbers do not depend on it (default: 1, every epoch as the authors)")
    clf.add_argument("--hidden_size_1", type=int_in(1, MAX_HIDDEN), default=512,
                     help="first hidden layer (default: 512)")
    clf.add_argument("--hidden_size_2", type=int_in(1, MAX_HIDDEN), default=256,
                     help="second hidden layer (default: 256)")
    add_run_args(parser, seed=100)
    return add_protocol(parser, AUTHORS)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the encoder, the downstream train
    and test splits, the trigger and, when given, the reference file (and the train split that
    gives the normalisation of a pre-training dataset without published statistics)."""
    files = {"encoder": args.encoder, "trigger": args.trigger_file,
             **split_input(args.data_dir, args.dataset, "train"), **split_input(args.data_dir, args.dataset, "test")}
    usage = encoder_usage(args.encoder, args.pretraining_dataset)
    if usage not in NORMALIZATION:
        files.update(split_input(args.data_dir, usage, "train"))
    if args.reference_file is not None:
        files["reference"] = args.reference_file
    return files


def target_label(args, num_classes):
    label = args.reference_label
    if args.reference_file is not None and label == -1:
        _, label = load_reference(args.reference_file)
    elif args.reference_file is not None:
        check_reference_label(label, args.reference_file, f"--reference_label {label}",
                              "pass the matching file, or drop one of the two")
    if label == -1:
        raise UserError("no target label: pass --reference_label or --reference_file")
    if not 0 <= label < num_classes:
        raise UserError(f"--reference_label {label} is outside the {num_classes} classes of {args.dataset} "
                        f"(0..{num_classes - 1})")
    return label


def train_one_epoch(clf, feats, labels, optimizer, batch_size, seed, epoch, shuffle=True):
    clf.train()
    total = 0.0
    batches = index_batches(len(feats), batch_size, seed, epoch, shuffle=shuffle, drop_last=False)
    for idx in batches:
        loss = F.cross_entropy(clf(feats[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(batches)


@torch.no_grad()
def predict(clf, feats):
    clf.eval()
    return clf(feats).argmax(dim=1)


def main(args):
    if args.results_dir is None:
        args.results_dir = str(Path(args.encoder).resolve().parent / f"downstream_{args.dataset}")
    out_dir, device = start_run(args, inputs=input_files(args))
    fingerprint = stage_fingerprint("downstream", args, input_files)
    encoder, ckpt = load_encoder(args.encoder)
    args.pretraining_dataset, mean, std = encoder_normalization(ckpt, args.encoder, args.pretraining_dataset,
                                                                args.data_dir, flag="--encoder_usage_info")
    train_x, train_y = load_split(args.data_dir, args.dataset, "train")
    test_x, test_y = load_split(args.data_dir, args.dataset, "test")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    target = target_label(args, num_classes)
    trigger = make_trigger(args.trigger, args.trigger_file, args.ctrl_magnitude, args.ctrl_window, test_x.shape[1:3])
    log = RunLog(out_dir, args)

    # The encoder is frozen: features are extracted once and the classifier trains on them in memory.
    encoder = encoder.to(device).eval().requires_grad_(False)
    feats = {name: extract_features(encoder, x, mean, std, device, desc=f"{name} features").to(device)
             for name, x in (("train", train_x), ("test", test_x),
                             ("triggered", trigger.apply(test_x)))}
    for name, f in feats.items():
        check_finite_features(f, f"the {name} images", args.encoder)
    check_not_collapsed(feats["train"].cpu(), args.encoder)
    train_labels = torch.as_tensor(train_y, device=device)
    print(f"{args.dataset}: {len(train_x)} train / {len(test_x)} test images, {num_classes} classes, "
          f"target label {target}; feature dim {feats['train'].shape[1]}")

    clf = DownstreamClassifier(feats["train"].shape[1], num_classes, args.hidden_size_1,
                               args.hidden_size_2).to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=args.lr)
    metrics = {}
    for epoch in progress(range(1, args.epochs + 1), desc="classifier"):
        t0 = time.time()
        loss = train_one_epoch(clf, feats["train"], train_labels, optimizer, args.batch_size, args.seed, epoch,
                               shuffle=args.train_order == "shuffled")
        check_finite(loss, epoch, what="downstream classifier's loss")
        if epoch % args.eval_freq and epoch != args.epochs:
            log.log({"epoch": epoch, "loss": loss, "seconds": round(time.time() - t0, 3)}, echo=False)
            continue
        metrics = backdoor_metrics(predict(clf, feats["test"]).cpu(), predict(clf, feats["triggered"]).cpu(),
                                   test_y, target)
        log.log({"epoch": epoch, "loss": loss, **metrics, "seconds": round(time.time() - t0, 3)}, echo=False)

    print(f"ACC (clean test accuracy)            {metrics['acc']:.2f}%")
    print(f"ASR (all triggered test images)      {metrics['asr']:.2f}%")
    print(f"ASR excluding target-class images    {metrics['asr_excluding_target']:.2f}%")
    Results(stage="downstream", args=vars(args), epochs=args.epochs, encoder=str(args.encoder), dataset=args.dataset,
            target_label=target, trigger=trigger.describe(), curve=log.read(), fingerprint=fingerprint,
            **metrics).save(out_dir / RESULTS)
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    run_cli(main, get_parser())
