"""SCALE-UP (Guo et al., ICLR 2023): flag inputs whose prediction survives amplified pixel values.

Multiplying a benign image's pixels by 3, 5, … and clipping to [0, 1] washes it out and its label
soon changes; a trigger the model has learnt to rely on keeps winning, so a stamped input keeps its
(target) label. The paper's statistic is the share of scaled copies that keep the label (scaled
prediction consistency, SPC). We score with the probability of the label instead (the soft SPC):
minus the mean over the scaled copies of the probability of *losing* the label, 1 − p, computed from
the log-odds so that it does not round to 0 for confident predictions. It orders inputs as the soft
SPC does, but it has no ties (with probabilities, over 1% of benign inputs keep their label with
probability 1.0 to float precision, and a threshold for FRR 1% would flag nothing), and being a mean
of terms in [0, 1] it lets :meth:`ScaleUp.screen` stop early. Calibration needs benign inputs only
(the paper's data-free threshold is replaced by the conformal quantile of benign scores, see
:mod:`trojanscan.defenses.consistency`).

Measured, it is weak on our models (AUROC 0.80 on the planted digits backdoor, 0.58 on the GTSRB
noise blend; see ``benchmarks/results/guard_bench.json``): amplifying a digit mostly thickens its
strokes and a sign mostly brightens, so benign labels survive too. It is therefore not in the guard
registry (it fails the common contract check, which asks 80% of stamped digits flagged at FRR 1%),
but it is a member the combined guard can take (``Guard(model, detectors=("strip", "teco",
"scale-up"))``, ``--detectors strip,teco,scale-up``).

Example::

    guard = ScaleUp(model).fit(clean_images)
    labels, trojaned = guard.predict(incoming_images)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trojanscan.defenses.consistency import LabelKeepingGuard
from trojanscan.errors import TrojanscanError

DEFAULT_SCALES = (3.0, 5.0, 7.0, 9.0, 11.0)  # the paper's set (×1 is the original prediction)
MAX_SCALES = 64


@dataclass(frozen=True)
class ScaleUpOptions:
    """SCALE-UP's settings (the constructor's keywords; see :class:`ScaleUp`)."""

    scales: tuple[float, ...] = DEFAULT_SCALES
    frr: float = 0.01
    batch_size: int = 256
    seed: int = 0
    accelerate: bool = True


def check_scales(scales: object) -> tuple[float, ...]:
    """1 to :data:`MAX_SCALES` finite amplification factors above 1."""
    values = tuple(scales) if isinstance(scales, (tuple, list)) else ()
    if not 1 <= len(values) <= MAX_SCALES or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 1
            for s in values):
        raise TrojanscanError(f"scales must be 1 to {MAX_SCALES} numbers above 1 (e.g. 3/5/7/9/11), "
                              f"got {scales!r}")
    return tuple(float(s) for s in values)


class ScaleUp(LabelKeepingGuard):
    """Run-time trojaned-input detector by scaled prediction consistency.

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits.
        scales: the amplification factors (pixels × s, clipped to [0, 1]); one forward pass each.
        frr: target false rejection rate of benign inputs, which sets the threshold.
        batch_size: about how many scaled images go to the model in one call.
        seed: kept for the common guard interface (SCALE-UP draws nothing at random).
        accelerate: on CPU, classify through a frozen oneDNN copy of the model where that is safe.
    """

    name = "scale-up"
    title = "SCALE-UP"
    what = "a SCALE-UP calibration"
    options_type = ScaleUpOptions
    _option_fields = ("scales",)

    def __init__(self, model: nn.Module, scales: tuple[float, ...] = DEFAULT_SCALES, frr: float = 0.01,
                 batch_size: int = 256, seed: int = 0, accelerate: bool = True) -> None:
        super().__init__(model, frr=frr, batch_size=batch_size, seed=seed, accelerate=accelerate)
        self.scales = check_scales(scales)

    @property
    def n_views(self) -> int:
        return len(self.scales)

    def views(self, x: torch.Tensor, which: range) -> torch.Tensor:
        s = torch.tensor([self.scales[j] for j in which], dtype=x.dtype, device=x.device)
        return (x.unsqueeze(1) * s.view(1, -1, 1, 1, 1)).clamp_(0.0, 1.0)
