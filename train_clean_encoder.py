"""Stage 0: train a clean SimCLR encoder from scratch.

The paper's setting (CIFAR-10, ResNet-18, batch 256, 1000 epochs; meant for a GPU):
    python -u train_clean_encoder.py --lr 1e-3 --results_dir output/cifar10/clean_encoder
Add --protocol authors for every option as the authors' code has it (docs/fidelity.md).
The same global batch on a node with 4 GPUs (--batch_size is per process):
    torchrun --nproc_per_node=4 train_clean_encoder.py --batch_size 64 --sync_bn \
        --results_dir output/cifar10/clean_encoder

Reads   <data_dir>/<pretraining_dataset>/train.npz (STL-10: train_unlabeled.npz), and train.npz
        and test.npz for the kNN monitor
Writes  <results_dir>/args.json, log.jsonl and log.csv (loss and kNN accuracy per epoch),
        checkpoint.pth (every epoch, for --resume), model_<epoch>.pth (every --save_freq
        epochs and at the last epoch), results.json
"""

import torch

from datasets import load_split, normalization, normalization_record, pretraining_split, split_input
from datasets.loader import ViewLoader, extract_features, to_input
from models import SimCLR, encoder_checkpoint, nt_xent
from models.encoder import INITS
from models.health import PROBE_IMAGES, check_finite_encoder
from models.knn import knn_predict
from utils.cli import (AUTHORS_RUN, MAX_WIDTH, StageParser, add_distributed_args, add_init_flag, add_pretraining_split,
                       add_protocol, add_run_args, int_in, learning_rate, nonnegative_float, nonnegative_int,
                       positive_float, positive_int, run_cli)
from utils.device import autocast, fast_paths, place
from utils.distributed import distribute, global_batch, is_main, mean_over_ranks
from utils.errors import UserError
from utils.fingerprint import stage_fingerprint
from utils.logs import check_finite, progress
from utils.stage import TrainingRun, check_batchnorm_batch, start_run

# --protocol authors: this stage as the authors' code runs it (docs/fidelity.md, first table).
AUTHORS = {
    "init": "torchvision",              # torchvision's resnet18() init, a fresh 3x3 conv1
    "pretraining_split": "auto",        # STL-10: train_unlabeled.npz
    "augment": "torchvision",           # the per-image PIL pipeline of their code
    **AUTHORS_RUN,                      # float32, torch's default layout, deterministic cuDNN
}


def get_parser():
    parser = StageParser(description="Stage 0: train a clean SimCLR encoder.")
    data = parser.add_argument_group("data")
    data.add_argument("--pretraining_dataset", default="cifar10",
                      help="dataset under --data_dir to train on; also names the normalisation (default: cifar10)")
    add_pretraining_split(data)
    data.add_argument("--encoder_usage", default=None,
                      help="dataset whose normalisation the encoder uses and records as its usage; set it when "
                           "--pretraining_dataset is a modified copy of it, e.g. CTRL's poisoned copy, which its "
                           "victims use as the original (default: --pretraining_dataset)")
    data.add_argument("--results_dir", default="output/cifar10/clean_encoder",
                      help="where checkpoints and logs go (default: output/cifar10/clean_encoder)")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"],
                       help="backbone (default: resnet18, the paper's)")
    model.add_argument("--width", type=int_in(1, MAX_WIDTH), default=64,
                       help="base width of the ResNet; 64 is the paper's network, 16 trains ~12x faster "
                            "on a CPU (default: 64)")
    add_init_flag(model, "the encoder's backbone", INITS)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=learning_rate, default=1e-3, help="Adam learning rate (default: 1e-3)")
    optim.add_argument("--weight_decay", type=nonnegative_float, default=1e-6, help="Adam weight decay (default: 1e-6)")
    optim.add_argument("--batch_size", type=positive_int, default=256,
                       help="images per step in each process; under torchrun with N processes a step "
                            "sees N x this many (default: 256)")
    optim.add_argument("--epochs", type=positive_int, default=1000, help="training epochs (default: 1000)")
    optim.add_argument("--temperature", type=positive_float, default=0.5, help="NT-Xent temperature (default: 0.5)")
    optim.add_argument("--augment", default="batched", choices=["batched", "torchvision"],
                       help="batched: augment whole batches on --device (fast); torchvision: the per-image "
                            "PIL pipeline in --num_workers processes (default: batched)")
    monitor = parser.add_argument_group("kNN monitor")
    monitor.add_argument("--knn_k", "--knn-k", type=positive_int, default=200, help="neighbours (default: 200)")
    monitor.add_argument("--knn_t", "--knn-t", type=positive_float, default=0.5, help="temperature (default: 0.5)")
    monitor.add_argument("--knn_freq", type=nonnegative_int, default=1,
                         help="run the monitor every this many epochs and at the last; 0 turns it off "
                              "(default: 1)")
    add_distributed_args(add_run_args(parser, seed=100, save_freq=100))
    return add_protocol(parser, AUTHORS)


def input_files(args):
    """The files this stage reads, by role (utils.fingerprint): the split it trains on, and the
    kNN monitor's train (memory bank, also the normalisation of unpublished datasets) and test splits."""
    split = pretraining_split(args.pretraining_dataset, args.pretraining_split)
    return {**split_input(args.data_dir, args.pretraining_dataset, split),
            **split_input(args.data_dir, args.pretraining_dataset, "train"),
            **split_input(args.data_dir, args.pretraining_dataset, "test")}


def train_one_epoch(model, loader, optimizer, temperature, epoch, out_dir, amp=False):
    """One epoch; model may be DDP-wrapped. Returns the mean loss of the global batches."""
    model.train()
    total, steps = 0.0, 0
    bar = progress(loader, desc=f"epoch {epoch}")
    for step, (view1, view2) in enumerate(bar):
        with autocast(view1.device, amp):
            _, z1 = model(view1)                                 # BxP
            _, z2 = model(view2)
        loss = nt_xent(z1.float(), z2.float(), temperature)     # gathers all processes' projections
        value = mean_over_ranks(loss).item()                     # the global batch's loss, in every process
        check_finite(value, epoch, step, out_dir)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + value, steps + 1
        bar.set_postfix(loss=f"{value:.4f}")
    return total / max(steps, 1)


def evaluate(model, train_x, train_y, test_x, test_y, mean, std, device, k, t):
    """kNN accuracy (%) of the test set against the training set as memory bank."""
    bank = extract_features(model, train_x, mean, std, device, desc="kNN bank").to(device)
    feats = extract_features(model, test_x, mean, std, device, desc="kNN test").to(device)
    labels = torch.as_tensor(train_y, device=device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(feats, bank, labels, num_classes, k, t).cpu()
    return 100.0 * (pred == torch.as_tensor(test_y)).float().mean().item()


def main(args):
    check_batchnorm_batch(args.batch_size)
    out_dir, device = start_run(args, args.resume, distributed=True, inputs=input_files(args))
    fingerprint = stage_fingerprint("clean_encoder", args, input_files)
    usage = args.encoder_usage or args.pretraining_dataset
    mean, std = normalization(usage, args.data_dir)
    split = pretraining_split(args.pretraining_dataset, args.pretraining_split)
    train_x, _ = load_split(args.data_dir, args.pretraining_dataset, split)
    images_per_step, batch_text = global_batch(args.batch_size)
    if len(train_x) < images_per_step:
        raise UserError(f"{len(train_x)} training images are fewer than one batch of --batch_size "
                        f"{batch_text}; lower --batch_size")
    bank = test = None           # the kNN monitor: labelled train split as memory bank, test split as queries
    if args.knn_freq > 0 and is_main():
        bank = load_split(args.data_dir, args.pretraining_dataset, "train")
        test = load_split(args.data_dir, args.pretraining_dataset, "test")

    amp, channels_last = fast_paths(args, device)
    model = place(SimCLR(args.arch, args.width, init=args.init), device, channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    meta = {"stage": "clean_encoder", "usage": usage, "normalization": normalization_record(usage, mean, std)}

    def checkpoint():
        return encoder_checkpoint(model, optimizer=optimizer.state_dict(), args=vars(args), **meta)

    probe = to_input(train_x[:PROBE_IMAGES], mean, std, device)      # the health check's images
    run = TrainingRun(out_dir, args, meta["stage"], guard=lambda: check_finite_encoder(model, probe, meta["stage"]),
                      fingerprint=fingerprint)
    start, _ = run.resume(model, optimizer)
    loader = ViewLoader(train_x, args.batch_size, mean, std, device, args.augment, args.num_workers, args.seed)
    trained = distribute(model, device, args.sync_bn)       # DDP under torchrun, else model itself
    knn_acc = None
    for epoch in range(start + 1, args.epochs + 1):
        loader.set_epoch(epoch)
        row = {"loss": train_one_epoch(trained, loader, optimizer, args.temperature, epoch, out_dir, amp)}
        if test is not None and (epoch % args.knn_freq == 0 or epoch == args.epochs):   # rank 0 only
            knn_acc = row["knn_acc"] = evaluate(model, *bank, *test, mean, std, device, args.knn_k, args.knn_t)
        run.log_epoch(epoch, row)
        run.save(epoch, checkpoint())
    encoder = run.finish(checkpoint(), knn_acc=knn_acc)
    print(f"clean encoder: {encoder}  kNN accuracy: {knn_acc}")


if __name__ == "__main__":
    run_cli(main, get_parser())
