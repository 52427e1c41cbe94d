"""Data on disk (npz splits, triggers, reference inputs), its normalisation and the augmentations applied to it."""
from .channel_stats import (NORMALIZATION, encoder_normalization, normalization, normalization_record,
                            resolve_normalization)
from .npz import (UNLABELED_SHADOW_IMAGES, load_reference, load_split, pretraining_split, save_reference, save_split,
                  split_input)
from .trigger import (FrequencyTrigger, PatchTrigger, load_trigger, make_square_trigger, make_trigger, save_trigger,
                      stamp_trigger)

__all__ = ["NORMALIZATION", "encoder_normalization", "UNLABELED_SHADOW_IMAGES", "load_reference", "load_split", "normalization",
           "normalization_record", "pretraining_split", "resolve_normalization", "save_reference", "save_split",
           "split_input", "FrequencyTrigger", "PatchTrigger", "load_trigger", "make_square_trigger", "make_trigger",
           "save_trigger", "stamp_trigger"]
