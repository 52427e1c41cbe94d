"""Data on disk (npz splits, triggers, reference inputs) and the augmentations applied to it."""
from .npz import NORMALIZATION, load_reference, load_split, normalization, save_reference, save_split
from .trigger import load_trigger, make_square_trigger, save_trigger, stamp_trigger

__all__ = ["NORMALIZATION", "load_reference", "load_split", "normalization", "save_reference",
           "save_split", "load_trigger", "make_square_trigger", "save_trigger", "stamp_trigger"]
