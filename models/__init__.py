"""Encoders, heads, losses and the mutual information estimator."""
from .encoder import (BLOCKS, SimCLR, attack_copy, build_encoder, encoder_checkpoint, freeze_batchnorm,
                      load_encoder)
from .heads import DownstreamClassifier
from .losses import attention_transfer, badencoder_loss, clone_loss, nt_xent
from .mine import convergence, estimate_mi, mi_to_weights, mi_warnings

__all__ = ["BLOCKS", "SimCLR", "attack_copy", "build_encoder", "encoder_checkpoint", "freeze_batchnorm",
           "load_encoder", "DownstreamClassifier", "attention_transfer", "badencoder_loss", "clone_loss", "nt_xent",
           "convergence", "estimate_mi", "mi_to_weights", "mi_warnings"]
