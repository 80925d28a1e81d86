"""The field's metrics as plain functions of predictions and labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trojanscan.errors import TrojanscanError


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of clean inputs classified correctly (CA)."""
    if len(labels) == 0:
        return float("nan")
    return float((predictions == labels).float().mean())


def attack_success_rate(stamped_predictions: torch.Tensor, labels: torch.Tensor,
                        target: int | torch.Tensor) -> float:
    """Fraction of stamped inputs sent to ``target`` among those whose true label is not ``target``.

    ``target`` is one label (all-to-one) or one per input (all-to-all: ``(label + 1) mod K``).
    Inputs already of the target label are left out: counting them would credit the attack with
    the model's clean accuracy on that class.
    """
    target = torch.as_tensor(target).expand_as(labels)
    keep = labels != target
    if not bool(keep.any()):
        return float("nan")
    return float((stamped_predictions[keep] == target[keep]).float().mean())


def _scores_and_classes(scores: Sequence[float], positives: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positives, dtype=bool)
    if s.ndim != 1 or s.shape != p.shape:
        raise ValueError(f"need one score per model: {s.shape} scores, {p.shape} classes")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    return s, p


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative,
    ties counting one half (the Mann–Whitney statistic). NaN when either class is empty."""
    s, p = _scores_and_classes(scores, positives)
    pos, neg = s[p], s[~p]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_curve(scores: Sequence[float],
              positives: Sequence[bool]) -> tuple[list[float], list[float], list[float]]:
    """ROC points: (fpr, tpr, thresholds), where point ``i > 0`` flags ``score >= thresholds[i]``
    over the distinct scores from the highest down, and point 0 flags nothing (threshold NaN)."""
    s, p = _scores_and_classes(scores, positives)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    fpr, tpr, thresholds = [0.0], [0.0], [float("nan")]
    for t in sorted({float(v) for v in s}, reverse=True):
        flagged = s >= t
        tpr.append(float((flagged & p).sum() / n_pos) if n_pos else float("nan"))
        fpr.append(float((flagged & ~p).sum() / n_neg) if n_neg else float("nan"))
        thresholds.append(t)
    return fpr, tpr, thresholds


def far_frr(benign_flags: torch.Tensor, trojan_flags: torch.Tensor) -> dict[str, float | int]:
    """Error rates of a detector: FRR = benign inputs flagged, FAR = trojaned inputs not flagged."""
    benign = torch.as_tensor(benign_flags, dtype=torch.bool).flatten()
    trojan = torch.as_tensor(trojan_flags, dtype=torch.bool).flatten()
    return {"frr": float(benign.float().mean()) if len(benign) else float("nan"),
            "far": float((~trojan).float().mean()) if len(trojan) else float("nan"),
            "n_benign": len(benign), "n_trojan": len(trojan)}


def mask_overlap(reversed_mask: torch.Tensor, true_mask: torch.Tensor) -> dict[str, Any]:
    """How well a reversed mask finds the real trigger: IoU and recall of its top-k pixels.

    ``k`` is the number of real trigger pixels (``true_mask > 0.5``; for a blended trigger whose
    constant mask is at most 0.5, every pixel with ``true_mask > 0``). The ``k`` pixels with the
    largest reversed-mask values are compared with them. ``k == 0`` gives NaN scores.
    """
    rev = torch.as_tensor(reversed_mask, dtype=torch.float32).detach().cpu()
    true = torch.as_tensor(true_mask, dtype=torch.float32).detach().cpu()
    if rev.shape != true.shape:
        raise TrojanscanError(f"reversed mask {tuple(rev.shape)} and real trigger mask "
                              f"{tuple(true.shape)} differ in size")
    rev_flat = torch.nan_to_num(rev.flatten(), nan=-1.0)
    true_set = true.flatten() > 0.5
    if not bool(true_set.any()):
        true_set = true.flatten() > 0
    k = int(true_set.sum())
    out: dict[str, Any] = {"iou": float("nan"), "recall": float("nan"), "k": k,
                           "reversed_l1": float(rev.sum()), "true_area": float(true.sum())}
    if k == 0:
        return out
    top = torch.zeros_like(true_set)
    top[torch.topk(rev_flat, k).indices] = True
    inter = int((top & true_set).sum())
    union = int((top | true_set).sum())
    out["iou"] = inter / union
    out["recall"] = inter / k
    return out
