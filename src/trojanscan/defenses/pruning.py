"""Neural Cleanse's neuron pruning: silence the neurons the reversed trigger drives until it stops working.

Neurons of the second-to-last layer (or a named Linear/Conv2d) are ranked by activation on
trigger-stamped images minus activation on clean images, and silenced in that order, ``step`` of the
layer at a time, until the reversed trigger's attack success rate falls below ``asr_threshold`` —
or until the next step would cost more clean accuracy than ``max_accuracy_drop`` (the accuracy
budget; the paper reports under 1 point for BadNets). Every step's clean accuracy and ASR form the
pruning curve. The pruned model has the neurons' weights
zeroed, so it saves in the same formats as the original.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from trojanscan.data.triggers import Trigger, stamp_each
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import attack_success_rate, clean_accuracy
from trojanscan.models.taps import (
    Layer,
    activations,
    check_prunable,
    find_layer,
    prune_weights,
    rank_neurons,
    silenced,
)
from trojanscan.progress import ProgressCallback, ProgressEvent, callback


@dataclass
class PruneResult:
    """The pruned model, the neurons removed (in order) and the curve measured on the way."""

    model: nn.Module
    layer: str
    units: int
    pruned: list[int]
    reached: bool  # the reversed trigger's ASR fell below the threshold within max_fraction
    asr_threshold: float
    curve: list[dict[str, float | int | None]] = field(default_factory=list)
    max_accuracy_drop: float | None = None
    over_budget: dict[str, float | int | None] | None = None  # the step refused for its accuracy cost

    @property
    def stopped_by_budget(self) -> bool:
        """Pruning stopped because the next step would have cost more than the accuracy budget."""
        return self.over_budget is not None

    @property
    def fraction(self) -> float:
        return len(self.pruned) / self.units


class Scorer:
    """Predicts clean and stamped images with a set of neurons silenced.

    When the layer is the input of a last Linear whose output is the model's output, the
    activations are computed once and only that Linear is rerun (exact, and 100× cheaper).
    """

    def __init__(self, model: nn.Module, layer: Layer, batches: dict[str, torch.Tensor]):
        self.model, self.layer, self.batches = model, layer, batches
        self.features = None
        if layer.side == "input":
            probe = next(iter(batches.values()))[:8]
            feats = activations(model, layer, probe)
            with torch.no_grad():
                model.eval()
                direct, full = layer.module(feats), model(probe)
            if direct.shape == full.shape and torch.allclose(direct, full, atol=1e-4, rtol=1e-4):
                self.features = {k: activations(model, layer, x) for k, x in batches.items()}

    @torch.no_grad()
    def predict(self, silence: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.features is not None:
            out = {}
            for k, f in self.features.items():
                f = f.clone()
                f[:, silence] = 0
                out[k] = self.layer.module(f).argmax(1)
            return out
        self.model.eval()
        with silenced(self.layer, silence):
            return {k: torch.cat([self.model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
                    for k, x in self.batches.items()}


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: list[Trigger], *,
          layer: str | None = None, asr_threshold: float = 0.01, step: float = 0.01,
          max_fraction: float = 0.9, real_trigger: Trigger | None = None,
          max_accuracy_drop: float | None = None,
          progress: ProgressCallback | bool | None = None) -> PruneResult:
    """Prune ``model`` (a copy; the original is untouched) against the reversed ``triggers``.

    ``x, y`` are clean images with labels, used to rank neurons and measure each step; the real
    trigger, when known, is only measured (never used to choose). With ``max_accuracy_drop`` (a
    fraction: 0.02 is 2 points) pruning stops before the first step whose clean accuracy on ``x``
    falls further than that below the unpruned model's (see :attr:`PruneResult.over_budget`).
    """
    for name, v in (("asr_threshold", asr_threshold), ("step", step), ("max_fraction", max_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise TrojanscanError(f"{name} must be in (0, 1], got {v!r}")
    if max_accuracy_drop is not None and (isinstance(max_accuracy_drop, bool) or not isinstance(
            max_accuracy_drop, (int, float)) or not 0 <= max_accuracy_drop <= 1):
        raise TrojanscanError(f"max_accuracy_drop must be in [0, 1] (0.02 = 2 points) or None, got "
                              f"{max_accuracy_drop!r}")
    if not triggers:
        raise TrojanscanError("pruning needs at least one reversed trigger")
    pruned_model = copy.deepcopy(model).eval()
    where = find_layer(pruned_model, layer, probe=x)
    check_prunable(where)
    batches = {"clean": x, **{f"rev{i}": t.apply(x) for i, t in enumerate(triggers)}}
    if real_trigger is not None:
        batches["real"] = real_trigger.apply_in_turn(x)  # a two-target trigger: one patch per image
    order, _ = rank_neurons(activations(pruned_model, where, x),
                            activations(pruned_model, where, stamp_each(x, triggers)))
    units = len(order)
    per_step = max(1, math.ceil(step * units))
    limit = max(1, math.floor(max_fraction * units))
    scorer = Scorer(pruned_model, where, batches)

    def measure(k: int) -> dict[str, float | int | None]:
        preds = scorer.predict(order[:k])
        rev = max(attack_success_rate(preds[f"rev{i}"], y, t.target) for i, t in enumerate(triggers))
        real = (attack_success_rate(preds["real"], y, real_trigger.intended_in_turn(y))
                if real_trigger is not None else None)
        return {"pruned": k, "fraction": k / units, "clean_accuracy": clean_accuracy(preds["clean"], y),
                "reversed_asr": rev, "real_asr": real}

    curve = [measure(0)]
    floor = None if max_accuracy_drop is None else curve[0]["clean_accuracy"] - max_accuracy_drop
    over_budget = None
    k = 0
    report = callback(progress)
    while curve[-1]["reversed_asr"] >= asr_threshold and k < limit:
        nxt = min(limit, k + per_step)
        point = measure(nxt)
        if floor is not None and point["clean_accuracy"] < floor - 1e-12:
            over_budget = point
        else:
            k = nxt
            curve.append(point)
        finished = over_budget is not None or curve[-1]["reversed_asr"] < asr_threshold or k >= limit
        if report is not None:
            report(ProgressEvent("pruning", k, limit, f"ASR {100 * curve[-1]['reversed_asr']:.1f}%",
                                 done=finished))
        if over_budget is not None:
            break
    reached = curve[-1]["reversed_asr"] < asr_threshold
    prune_weights(where, order[:k])
    return PruneResult(model=pruned_model, layer=where.label, units=units,
                       pruned=[int(i) for i in order[:k]], reached=reached,
                       asr_threshold=float(asr_threshold), curve=curve,
                       max_accuracy_drop=max_accuracy_drop, over_budget=over_budget)
