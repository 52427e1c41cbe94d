"""Attacks and defences as plug-ins: methods.registry, and one module per method (docs/methods.md).

Importing the package registers the built-in methods in the tables' order.
"""
from . import badencoder, drupe, ctrl, mimic, baselines, decree  # noqa: F401  (each registers its methods)
from .registry import (ATTACK_KINDS, BASELINES, DEFENCE_KINDS, Attack, Defence, Detector, attack_label, attacks,
                       defences, detect_folder, detectors, encoder_folders, eval_folder, figure_group, first_attack,
                       fraction_text, get, label, matrix_row, named, register, stages, table_key, term_labels,
                       unregister)

__all__ = ["ATTACK_KINDS", "BASELINES", "DEFENCE_KINDS", "Attack", "Defence", "Detector", "attack_label", "attacks",
           "defences", "detect_folder", "detectors", "encoder_folders", "eval_folder", "figure_group", "first_attack",
           "fraction_text", "get", "label", "matrix_row", "named", "register", "stages", "table_key", "term_labels",
           "unregister"]
