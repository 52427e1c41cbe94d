"""Data on disk (npz splits, triggers, reference inputs) and the augmentations applied to it."""
from .npz import (NORMALIZATION, UNLABELED_SHADOW_IMAGES, load_reference, load_split, normalization,
                  pretraining_split, save_reference, save_split)
from .trigger import load_trigger, make_square_trigger, save_trigger, stamp_trigger

__all__ = ["NORMALIZATION", "UNLABELED_SHADOW_IMAGES", "load_reference", "load_split", "normalization",
           "pretraining_split", "save_reference",
           "save_split", "load_trigger", "make_square_trigger", "save_trigger", "stamp_trigger"]
