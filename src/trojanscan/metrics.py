"""The field's metrics as plain functions of predictions and labels."""

from __future__ import annotations

import torch


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of clean inputs classified correctly (CA)."""
    if len(labels) == 0:
        return float("nan")
    return float((predictions == labels).float().mean())


def attack_success_rate(stamped_predictions: torch.Tensor, labels: torch.Tensor,
                        target: int) -> float:
    """Fraction of stamped inputs sent to ``target`` among those whose true label is not ``target``.

    Inputs already of the target label are left out: counting them would credit the attack with
    the model's clean accuracy on that class.
    """
    keep = labels != target
    if not bool(keep.any()):
        return float("nan")
    return float((stamped_predictions[keep] == target).float().mean())
