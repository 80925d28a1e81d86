"""TABOR (Guo et al., 2019): Neural Cleanse's trigger search with regularisers against false triggers,
and a trigger-quality metric to rank the candidates.

The extra loss terms per candidate label t, with mask m, pattern Δ and Δ' = (1 − m) ⊙ Δ:

- R1, overly large triggers: λ1·(‖m‖₁ + ‖m‖₂²) + λ2·(‖Δ'‖₁ + ‖Δ'‖₂²)
- R2, scattered triggers: λ3·s(m) + λ4·s(Δ'), s = sum of squared horizontal and vertical neighbour
  differences
- R3, triggers that cover the object: λ5·CE(f(x ⊙ (1 − m)), y)
- R4, triggers that only work on top of an image: λ6·CE(f(m ⊙ Δ), t)

The λs start at the public defaults and are rescaled per label by the step's misclassification
rate (hyperparameter augmentation): after ``patience`` steps that still flip clean inputs to t they
double; after ``patience`` steps that do not, they shrink by 2^1.5, as Neural Cleanse's own λ does.
Everything else (injection, batching over labels, schedule, resume, result files) is the shared
engine's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.defenses.base import LabelScore
from trojanscan.defenses.neural_cleanse import NeuralCleanse, NeuralCleanseOptions
from trojanscan.defenses.outliers import mad_anomaly_index
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.trigger_search import SearchSchedule
from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating
from trojanscan.train import predict

SCALE_LIMITS = (1e-3, 1e5)  # hyperparameter augmentation never moves the λs further than this


@dataclass(frozen=True)
class TaborWeights:
    """λ1…λ6 (the public implementation's defaults)."""

    mask_size: float = 1e-6  # λ1: elastic net on the mask
    pattern_size: float = 1e-5  # λ2: elastic net on the pattern outside the mask
    mask_smooth: float = 1e-7  # λ3: neighbour smoothness of the mask
    pattern_smooth: float = 1e-8  # λ4: neighbour smoothness of the pattern outside the mask
    crop: float = 0.0  # λ5: the image without the trigger region keeps its label
    alone: float = 1e-2  # λ6: the trigger alone is classified as the target

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TrojanscanError(f"TABOR weight {name} must be a finite number >= 0, got {v!r}")


def elastic(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖t‖₁ + ‖t‖₂² over all but the first axis."""
    flat = t.flatten(1)
    return flat.abs().sum(1) + flat.pow(2).sum(1)


def smoothness(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared differences between horizontal and vertical neighbours (last 2 axes)."""
    dh = (t[..., :, 1:] - t[..., :, :-1]).pow(2).flatten(1).sum(1)
    dv = (t[..., 1:, :] - t[..., :-1, :]).pow(2).flatten(1).sum(1)
    return dh + dv


def tabor_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor,
                pattern: torch.Tensor, targets: torch.Tensor, w: TaborWeights) -> dict[str, torch.Tensor]:
    """R1…R4 for A candidate triggers (mask A×H×W, pattern A×C×H×W) on clean images x (B×C×H×W)."""
    outside = (1 - mask).unsqueeze(1) * pattern  # Δ'
    zero = mask.new_zeros(len(mask))
    terms = {"r1": w.mask_size * elastic(mask) + w.pattern_size * elastic(outside),
             "r2": w.mask_smooth * smoothness(mask) + w.pattern_smooth * smoothness(outside),
             "r3": zero, "r4": zero}
    if w.crop > 0:
        if y is None:
            y = predict(model, x)
        cropped = (1 - mask)[:, None, None] * x.unsqueeze(0)  # A×B×C×H×W
        ce = F.cross_entropy(model(cropped.flatten(0, 1)), y.repeat(len(mask)), reduction="none")
        terms["r3"] = w.crop * ce.view(len(mask), -1).mean(1)
    if w.alone > 0:
        alone = mask.unsqueeze(1) * pattern
        terms["r4"] = w.alone * F.cross_entropy(model(alone), targets, reduction="none")
    return terms


class TaborRegularizer:
    """The engine's regulariser hook: R1…R4, each label's λs rescaled by its own success."""

    def __init__(self, weights: TaborWeights, schedule: SearchSchedule) -> None:
        self.weights, self.schedule = weights, schedule
        self.scale: dict[int, float] = {}
        self._up: dict[int, int] = {}
        self._down: dict[int, int] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor,
                 pattern: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms = tabor_terms(model, x, y, mask, pattern, targets, self.weights)
        scale = torch.tensor([self.scale.get(int(t), 1.0) for t in targets], dtype=mask.dtype,
                             device=mask.device)
        return scale * sum(terms.values())

    def end_step(self, label: int, asr: float) -> None:
        s = self.schedule
        if asr >= s.asr_threshold:
            self._up[label], self._down[label] = self._up.get(label, 0) + 1, 0
        else:
            self._up[label], self._down[label] = 0, self._down.get(label, 0) + 1
        factor = 1.0
        if self._up[label] >= s.patience:
            self._up[label], factor = 0, s.cost_up
        elif self._down[label] >= s.patience:
            self._down[label], factor = 0, 1 / s.cost_down
        lo, hi = SCALE_LIMITS
        self.scale[label] = min(hi, max(lo, self.scale.get(label, 1.0) * factor))


@torch.no_grad()
def trigger_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor,
                    pattern: torch.Tensor, target: int) -> dict[str, float]:
    """TABOR's quality score A of one trigger (lower: smaller, more compact, more effective).

    ``A = log(‖F‖₁/d²) + log(s(F)/(d(d−1))) − log(acc_att) − log(acc_crop) − log(acc_exp)``, with
    F the trigger's footprint (mask > 0.5, at least its strongest pixel: the paper's m ⊙ Δ > 0
    would count every pixel of a continuous mask, and none of a black patch), d² = H·W, acc_att its
    success rate on clean images not of the target, acc_crop the accuracy of clean images with the
    footprint blanked out, and acc_exp the probability the model gives the target for the trigger
    alone (a probability rather than a 0/1 hit, so one image still gives a usable score).
    """
    h, w = mask.shape
    if h * w < 2:
        raise TrojanscanError("the trigger-quality metric needs images of at least 2 pixels")
    footprint = (mask > 0.5).float()
    if footprint.sum() == 0:
        footprint.view(-1)[mask.argmax()] = 1.0
    d2, d = float(h * w), math.sqrt(h * w)
    labels = predict(model, x) if y is None else y
    others = x[labels != target]
    stamped = (1 - mask) * others + mask * pattern
    acc_att = float((predict(model, stamped) == target).float().mean()) if len(others) else 0.0
    acc_crop = float((predict(model, (1 - footprint) * x) == labels).float().mean())
    with evaluating(model):
        acc_exp = float(torch.softmax(model((mask * pattern).unsqueeze(0)), 1)[0, target])
    floor = 1e-3
    size = float(footprint.sum()) / d2
    scatter = max(float(smoothness(footprint.unsqueeze(0))[0]), 1.0) / (d * (d - 1))
    score = (math.log(size) + math.log(scatter) - math.log(max(acc_att, floor))
             - math.log(max(acc_crop, floor)) - math.log(max(acc_exp, floor)))
    return {"quality": score, "footprint": float(footprint.sum()), "acc_att": acc_att,
            "acc_crop": acc_crop, "acc_exp": acc_exp}


@dataclass(frozen=True)
class TaborOptions(NeuralCleanseOptions):
    """Neural Cleanse's settings plus TABOR's λs."""

    weights: TaborWeights = field(default_factory=TaborWeights)


class Tabor(NeuralCleanse):
    """TABOR detection: Neural Cleanse's engine and verdict, plus R1…R4 and the quality metric.

    Example::

        result = Tabor(chunk=10, seed=0).scan(model, x_clean, y_clean, num_classes=10)
        print(result.flagged_labels, result.extra["quality"]["flagged_labels"])
    """

    name = "tabor"
    title = "TABOR"
    options_type = TaborOptions
    label_scores = (LabelScore("quality", "TABOR quality"),
                    LabelScore("quality_anomaly_index", "quality anomaly index"))
    outlier_summary = "quality"

    def __init__(self, schedule: str | SearchSchedule = "default", *, weights: TaborWeights | None = None,
                 **options: Any) -> None:
        super().__init__(schedule, **options)
        self.weights = weights or TaborWeights()
        if not isinstance(self.weights, TaborWeights):
            raise TrojanscanError(f"weights must be TaborWeights, got {type(self.weights).__name__}")

    def _regularizer(self) -> TaborRegularizer:
        return TaborRegularizer(self.weights, self.search_schedule())

    def _method_params(self) -> dict[str, Any]:
        return {**super()._method_params(), "weights": asdict(self.weights)}

    def _after(self, result: ScanResult, model: nn.Module, x: torch.Tensor,
               y: torch.Tensor | None) -> None:
        """Score every label's trigger and flag the quality outliers beside the L1 verdict."""
        for r in result.labels:
            r.extra.update(trigger_quality(model, x, y, r.mask, r.pattern, r.label))
        self.summarise(result)

    @classmethod
    def summarise(cls, result: ScanResult) -> None:
        """The quality outliers over all labels, from each label's stored quality score."""
        scores = [r.extra["quality"] for r in result.labels]
        values = {str(r.label): q for r, q in zip(result.labels, scores, strict=True)}
        summary: dict[str, Any] = {"values": values}
        if len(scores) >= 3:
            report = mad_anomaly_index(scores, result.threshold)
            for r, ai in zip(result.labels, report.anomaly_index, strict=True):
                r.extra["quality_anomaly_index"] = ai
            summary.update({"flagged_labels": [result.labels[i].label for i in report.flagged],
                            "anomaly_index": report.model_anomaly_index, "median": report.median,
                            "mad": report.mad})
        result.extra["quality"] = summary
