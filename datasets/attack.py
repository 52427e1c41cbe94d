"""The inputs of the attacks that fine-tune a clean encoder (BadEncoder, DRUPE): the flags they
share, the files a run reads, its shadow images, reference inputs and trigger, each checked with a
one-line error, and what every training step of such an attack reads."""
from dataclasses import dataclass

import torch

from paper import TRIGGER, find_task
from utils.cli import (add_pretraining_split, int_at_least, learning_rate, nonnegative_float, positive_int,
                       unit_interval)
from utils.errors import UserError

from .channel_stats import NORMALIZATION
from .loader import extract_features
from .npz import UNLABELED_SHADOW_IMAGES, load_reference, load_split, pretraining_split, split_input
from .trigger import load_trigger, stamp_trigger


def add_attack_data(parser, name, tasks, released, references="reference inputs"):
    """The data flags of an attack stage, in a group it returns for the stage's own. name: the
    stage's folder under output/cifar10; tasks: {pretraining dataset: [Task]}, whose reference
    files --downstreamTask picks (`released` says whose they are); references: what a reference
    file must hold."""
    data = parser.add_argument_group("data")
    data.add_argument("--pretraining_dataset", default=None,
                      help="dataset the encoder was pre-trained on: the images to train on, and the "
                           "normalisation unless the encoder carries its own (default: the encoder's own, "
                           "else cifar10)")
    data.add_argument("--shadow_dataset", default=None,
                      help="shadow data under --data_dir: its train split, or the first 50,000 images of "
                           "train_unlabeled for STL-10 (default: the pre-training dataset)")
    add_pretraining_split(data)
    data.add_argument("--downstreamTask", "--downstream_task", dest="downstream_task", default="gtsrb",
                      help=f"downstream task the attacker targets; picks the default reference file, {released}: "
                           + "; ".join(f"{t.pretraining} encoders: {t.dataset} -> {t.reference}"
                                       for by_usage in tasks.values() for t in by_usage) + " (default: gtsrb)")
    data.add_argument("--trigger_file", default=TRIGGER, help=f"trigger npz (t, tm) (default: {TRIGGER})")
    data.add_argument("--reference_file", default=None,
                      help=f"npz of {references} of the target class (default: the file --downstreamTask picks "
                           "for --pretraining_dataset)")
    data.add_argument("--target_label", type=int_at_least(0), default=None,
                      help="attacker's target label; when given, the reference file's label must equal it "
                           "(default: the reference file's label)")
    data.add_argument("--pretrained_encoder", required=True, help="clean encoder checkpoint (stage 0)")
    data.add_argument("--results_dir", default=f"output/cifar10/{name}",
                      help=f"where checkpoints and logs go (default: output/cifar10/{name})")
    return data


def add_attack_optimisation(parser, lr, epochs, terms):
    """The SGD and loss-weight flags of an attack stage, in a group it returns for the stage's own
    (batch, reference copies, ...). lr (as its help shows it, e.g. "1e-3"), epochs: the defaults;
    terms: the names of the reference-preserving and utility terms in the stage's log."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=learning_rate, default=float(lr), help=f"SGD learning rate (default: {lr})")
    optim.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--weight_decay", type=nonnegative_float, default=5e-4, help="SGD weight decay (default: 5e-4)")
    optim.add_argument("--epochs", type=positive_int, default=epochs, help=f"training epochs (default: {epochs})")
    optim.add_argument("--lambda1", type=nonnegative_float, default=1.0,
                       help=f"weight of the reference-preserving term {terms[0]} (default: 1.0)")
    optim.add_argument("--lambda2", type=nonnegative_float, default=1.0,
                       help=f"weight of the utility term {terms[1]} (default: 1.0)")
    return optim


def reference_file(args, usage, tasks):
    """--reference_file, else the reference file of --downstreamTask among `tasks` for encoders
    pre-trained on usage (None when there is no such task)."""
    if args.reference_file is not None:
        return args.reference_file
    task = find_task(tasks, usage, args.downstream_task)
    return task.reference if task is not None else None


def attack_input_files(data_dir, usage, shadow_dataset, split_choice, pretrained_encoder, trigger_file,
                       reference_file):
    """The files an attack stage reads, by role (utils.fingerprint): the clean encoder, the shadow
    split (of shadow_dataset, else of usage, the dataset the encoder was pre-trained on), the
    trigger, the reference file (None: not known yet, the stage reports it) and the train split
    that gives the normalisation of a dataset without published statistics."""
    shadow = shadow_dataset or usage
    files = {"pretrained_encoder": pretrained_encoder, "trigger": trigger_file,
             **split_input(data_dir, shadow, pretraining_split(shadow, split_choice))}
    if usage not in NORMALIZATION:
        files.update(split_input(data_dir, usage, "train"))
    if reference_file is not None:
        files["reference"] = reference_file
    return files


def attack_stage_inputs(args, usage, tasks):
    """attack_input_files of an attack stage's parsed flags, for an encoder pre-trained on usage."""
    return attack_input_files(args.data_dir, usage, args.shadow_dataset, args.pretraining_split,
                              args.pretrained_encoder, args.trigger_file, reference_file(args, usage, tasks))


def shadow_images(data_dir, shadow, split_choice, unlabeled_images=UNLABELED_SHADOW_IMAGES):
    """The shadow split's images (NxHxWx3 uint8) and the split's name. An unlabeled split (STL-10's)
    is cut to its first `unlabeled_images`: the authors' shadow data are its first 50,000."""
    split = pretraining_split(shadow, split_choice)
    x, _ = load_split(data_dir, shadow, split)
    if split == "train_unlabeled":
        x = x[:unlabeled_images]
    return x, split


def check_reference(ref_x, label, path, target_label, image_shape):
    """Reference inputs (RxHxWx3 uint8, of `label`, read from `path` by datasets.load_reference) fit
    the attack: their label equals target_label when that is given, and their images have the
    shadow images' HxWx3 image_shape."""
    if target_label is not None and label != target_label:
        raise UserError(f"the reference file {path} holds inputs of label {label}, but the "
                        f"target label is {target_label} (--target_label); pass the reference file of "
                        f"the target class")
    if ref_x.shape[1:] != tuple(image_shape):
        raise UserError(f"reference inputs are {ref_x.shape[1]}x{ref_x.shape[2]} but the shadow images "
                        f"are {image_shape[0]}x{image_shape[1]}")


def load_reference_and_trigger(args, tasks, image_shape):
    """The reference inputs, their label, and the trigger (t, tm) for shadow images of HxWx3
    image_shape, each checked; args.reference_file is set to the file read."""
    path = reference_file(args, args.pretraining_dataset, tasks)
    if path is None:
        raise UserError(f"no default reference file for --downstreamTask {args.downstream_task} with "
                        f"{args.pretraining_dataset} encoders; pass --reference_file")
    args.reference_file = path
    ref_x, target = load_reference(path)
    check_reference(ref_x, target, path, args.target_label, image_shape)
    t, tm = load_trigger(args.trigger_file, image_size=image_shape[:2])
    return ref_x, target, t, tm


@dataclass
class AttackData:
    """What every step of an attack reads. The clean encoder is frozen and its inputs are not
    augmented, so its features are computed once."""
    shadow: torch.Tensor            # NxHxWx3 uint8 clean shadow images
    triggered: torch.Tensor         # NxHxWx3 uint8, the same images with the trigger stamped
    shadow_clean: torch.Tensor      # NxD clean encoder's features of the shadow images
    reference: torch.Tensor         # RxHxWx3 uint8 reference inputs, on the device
    reference_clean: torch.Tensor   # RxD clean encoder's features of the reference inputs
    mean: tuple
    std: tuple

    @classmethod
    def build(cls, clean, x, t, tm, ref_x, mean, std, device):
        """From the frozen clean encoder, the shadow images x, the trigger and the reference inputs."""
        return cls(shadow=torch.from_numpy(x), triggered=torch.from_numpy(stamp_trigger(x, t, tm)),
                   shadow_clean=extract_features(clean, x, mean, std, device, desc="clean features").to(device),
                   reference=torch.from_numpy(ref_x).to(device),
                   reference_clean=extract_features(clean, ref_x, mean, std, device).to(device), mean=mean, std=std)
