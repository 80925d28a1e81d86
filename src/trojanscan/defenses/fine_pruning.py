"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018): prune the channels that clean inputs leave
dormant, then fine-tune on clean data. It needs no trigger and no scan: a backdoor tends to live in
neurons that clean inputs barely use, and fine-tuning then repairs what pruning left.

1. The channels of the last convolution (or a named Linear/Conv2d, or the penultimate layer of a net
   without convolutions) are ranked by their mean activation on held-out clean images, after the
   ReLU (``max(0, output)``), lowest first.
2. They are silenced ``step`` of the layer at a time, up to ``max_fraction``, stopping before the
   first step that costs more than ``max_accuracy_drop`` of clean accuracy on those images (the
   paper's 4%). Every step's accuracy (and the ASR of any trigger handed in, only measured) forms the
   pruning curve.
3. The pruned net is fine-tuned on ``fraction`` of the clean training split (Adam at a small
   constant learning rate: a one-cycle peak on a few batches undoes more than it repairs); the pruned
   channels stay at zero (their gradients are masked), as if removed.

The pruned channels' weights are zeroed (see :func:`~trojanscan.models.taps.prune_weights`), so
the model saves in its usual formats.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from trojanscan.data.triggers import Trigger
from trojanscan.defenses.pruning import Scorer
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import attack_success_rate, clean_accuracy
from trojanscan.models.modes import evaluating
from trojanscan.models.taps import (
    Layer,
    activations,
    call_order,
    check_prunable,
    find_layer,
    prune_weights,
)
from trojanscan.progress import ProgressCallback, ProgressEvent, callback
from trojanscan.train import TrainHistory, train_model, trainable_copy
from trojanscan.validation import check_fraction


@dataclass
class FinePruneResult:
    """The fine-pruned model, the channels removed (in order), the curve and the fine-tuning."""

    model: nn.Module
    pruned_model: nn.Module  # after pruning, before fine-tuning
    layer: str
    units: int
    pruned: list[int]
    curve: list[dict[str, float | int | None]] = field(default_factory=list)
    over_budget: dict[str, float | int | None] | None = None  # the step refused for its accuracy cost
    images: int = 0  # clean images fine-tuned on
    history: TrainHistory | None = None

    @property
    def fraction(self) -> float:
        return len(self.pruned) / self.units


def last_conv_layer(model: nn.Module, probe: torch.Tensor) -> Layer:
    """The output of the last ``nn.Conv2d`` a forward pass calls; the penultimate layer when none."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order = call_order(model, convs, probe) if convs else []
    if not order:
        return find_layer(model, None, probe)
    return Layer(order[-1], convs[order[-1]], "output")


@torch.no_grad()
def dormancy_order(model: nn.Module, layer: Layer, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The layer's neurons from least to most active on clean ``x``: mean of ``max(0, ·)`` over the
    images (and a channel's positions)."""
    if layer.side == "input":  # the input of the last Linear already comes out of its activation
        mean = activations(model, layer, x, batch_size).mean(0)
    else:
        sums: list[torch.Tensor] = []
        handle = layer.module.register_forward_hook(
            lambda _m, _a, out: sums.append(out.clamp(min=0).flatten(2).mean(2).sum(0) if out.dim() == 4
                                            else out.clamp(min=0).sum(0)))
        try:
            with evaluating(model):
                for i in range(0, len(x), batch_size):
                    model(x[i:i + batch_size])
        finally:
            handle.remove()
        mean = torch.stack(sums).sum(0) / len(x)
    return torch.argsort(mean, stable=True)


def _keep_pruned_at_zero(layer: Layer, neurons: torch.Tensor) -> list[torch.utils.hooks.RemovableHandle]:
    """Gradient hooks that keep the pruned neurons' weights (and biases) at zero while fine-tuning."""
    m, idx = layer.module, torch.as_tensor(neurons, dtype=torch.long)

    def masker(rows: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            if rows:
                grad[idx] = 0
            else:
                grad[:, idx] = 0
            return grad
        return hook

    if layer.side == "input":
        return [m.weight.register_hook(masker(rows=False))]
    handles = [m.weight.register_hook(masker(rows=True))]
    if m.bias is not None:
        handles.append(m.bias.register_hook(masker(rows=True)))
    return handles


def fine_prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_train: torch.Tensor,
               y_train: torch.Tensor, *, layer: str | None = None, step: float = 0.05,
               max_fraction: float = 0.9, max_accuracy_drop: float | None = 0.04, fraction: float = 0.1,
               epochs: int = 2, lr: float = 2e-4, batch_size: int = 64, seed: int = 0,
               triggers: list[Trigger] | None = None, real_trigger: Trigger | None = None,
               progress: ProgressCallback | bool | None = None) -> FinePruneResult:
    """Fine-prune a copy of ``model`` (the original is untouched).

    ``x, y`` are held-out clean images that rank the channels and measure each step; ``x_train,
    y_train`` the clean training split, ``fraction`` of which fine-tunes. Reversed ``triggers`` and
    the ``real_trigger``, when known, are only measured along the curve, never used to choose.
    ``max_accuracy_drop`` is a fraction (0.04 is the paper's 4 points) or None (prune up to
    ``max_fraction``).
    """
    for name, v in (("step", step), ("max_fraction", max_fraction)):
        check_fraction(name, v, high_inclusive=True)
    if max_accuracy_drop is not None:
        check_fraction("max_accuracy_drop", max_accuracy_drop, low_inclusive=True, high_inclusive=True)
    check_fraction("fraction of training data", fraction, high_inclusive=True)
    if len(x) != len(y) or len(x_train) != len(y_train):
        raise TrojanscanError("fine-pruning needs one label per image")
    if len(x) == 0 or len(x_train) == 0:
        raise TrojanscanError("fine-pruning needs clean images to rank channels and to fine-tune on")
    triggers = list(triggers or [])
    pruned_model = copy.deepcopy(model).eval()
    where = last_conv_layer(pruned_model, x) if layer is None else find_layer(pruned_model, layer, probe=x)
    check_prunable(where)
    order = dormancy_order(pruned_model, where, x)
    units = len(order)
    per_step = max(1, math.ceil(step * units))
    limit = max(1, math.floor(max_fraction * units))
    batches = {"clean": x, **{f"rev{i}": t.apply(x) for i, t in enumerate(triggers)}}
    if real_trigger is not None:
        batches["real"] = real_trigger.apply_in_turn(x)  # a two-target trigger: one patch per image
    scorer = Scorer(pruned_model, where, batches)

    def measure(k: int) -> dict[str, float | int | None]:
        preds = scorer.predict(order[:k])
        rev = [attack_success_rate(preds[f"rev{i}"], y, t.target) for i, t in enumerate(triggers)]
        real = (attack_success_rate(preds["real"], y, real_trigger.intended_in_turn(y))
                if real_trigger is not None else None)
        return {"pruned": k, "fraction": k / units, "clean_accuracy": clean_accuracy(preds["clean"], y),
                "reversed_asr": max(rev) if rev else None, "real_asr": real}

    curve = [measure(0)]
    floor = None if max_accuracy_drop is None else curve[0]["clean_accuracy"] - max_accuracy_drop
    over_budget, k = None, 0
    report = callback(progress)
    while k < limit:
        point = measure(min(limit, k + per_step))
        if floor is not None and point["clean_accuracy"] < floor - 1e-12:
            over_budget = point
            break
        k = int(point["pruned"])
        curve.append(point)
        if report is not None:
            report(ProgressEvent("pruning", k, limit, f"CA {100 * point['clean_accuracy']:.1f}%",
                                 done=k >= limit))
    prune_weights(where, order[:k])
    tuned = trainable_copy(pruned_model)
    tuned_layer = Layer(where.name, dict(tuned.named_modules())[where.name], where.side)
    n = max(1, round(fraction * len(x_train)))
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:n]
    handles = _keep_pruned_at_zero(tuned_layer, order[:k])
    try:
        history = train_model(tuned, x_train[idx], y_train[idx], epochs=epochs, batch_size=batch_size, lr=lr,
                              seed=seed, progress=progress, lr_schedule="constant")
    finally:
        for h in handles:
            h.remove()
    prune_weights(tuned_layer, order[:k])  # exactly zero, whatever the optimiser did with zero gradients
    for p in tuned.parameters():
        p.requires_grad_(False)
    return FinePruneResult(model=tuned.eval(), pruned_model=pruned_model, layer=where.label, units=units,
                           pruned=[int(i) for i in order[:k]], curve=curve, over_budget=over_budget,
                           images=n, history=history)
