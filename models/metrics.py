"""Clean accuracy and attack success rate of a downstream classifier."""
import torch


def backdoor_metrics(pred_clean, pred_triggered, labels, target):
    """Percentages from predictions on the clean and the triggered test set (same images, same order).

    acc                  share of clean test images classified correctly
    asr                  share of all triggered test images classified as the target label (the
                         definition of the BadEncoder and MIMIC papers)
    asr_excluding_target the same over test images whose true label is not the target
    """
    labels = torch.as_tensor(labels)
    hit = (torch.as_tensor(pred_triggered) == target).double()
    others = labels != target
    return {
        "acc": 100.0 * (torch.as_tensor(pred_clean) == labels).double().mean().item(),
        "asr": 100.0 * hit.mean().item(),
        "asr_excluding_target": 100.0 * hit[others].mean().item() if others.any() else float("nan"),
    }
