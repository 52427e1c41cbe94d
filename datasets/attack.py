"""The inputs of the attacks that fine-tune a clean encoder (BadEncoder, DRUPE): the files a run
reads, its shadow images and its reference inputs, each checked with a one-line error, and what
every training step of such an attack reads."""
from dataclasses import dataclass

import torch

from utils.errors import UserError

from .channel_stats import NORMALIZATION
from .npz import UNLABELED_SHADOW_IMAGES, load_split, pretraining_split, split_input


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
