"""One seeded training loop and the evaluation (CA, ASR) used by attacks, repairs and the demo."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import attack_success_rate, clean_accuracy
from trojanscan.models.modes import evaluating
from trojanscan.progress import ProgressCallback, ProgressEvent, callback


@dataclass
class TrainHistory:
    """Per-epoch loss, training accuracy and seconds."""

    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are leaf tensors that require gradients, ready for an
    optimiser; the original is untouched.

    The copy is made without autograd: ``copy.deepcopy`` of a TorchScript module (or of a module that
    holds one) clones its parameters through autograd otherwise, and an optimiser then refuses them
    ("can't optimize a non-leaf Tensor").
    """
    with torch.no_grad():
        fixed = copy.deepcopy(model)
    for p in fixed.parameters():
        p.requires_grad_(True)
    return fixed


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1,
                batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                seed: int = 0, progress: ProgressCallback | bool | None = None,
                lr_schedule: str = "onecycle",
                on_epoch: Callable[[int, TrainHistory], None] | None = None) -> TrainHistory:
    """Train with Adam and cross-entropy on shuffled mini-batches; deterministic for a seed.

    ``progress``, a callback, receives a :class:`ProgressEvent` per batch (nothing is drawn here).

    ``lr_schedule`` "onecycle" warms the learning rate up to ``2·lr`` and anneals it to ~0 over
    the run (GTSRB: 97% instead of 94% in 6 epochs); "constant" keeps ``lr``.
    """
    if len(x) == 0:
        raise TrojanscanError("cannot train on an empty training set")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise TrojanscanError("epochs and batch size must be >= 1 and the learning rate > 0")
    if lr_schedule not in ("onecycle", "constant"):
        raise TrojanscanError(f"unknown learning-rate schedule {lr_schedule!r}; use onecycle or constant")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = TrainHistory()
    n_batches = (len(x) + batch_size - 1) // batch_size
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * lr, total_steps=epochs * n_batches)
                 if lr_schedule == "onecycle" else None)
    model.train()
    report = callback(progress)
    done = 0
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        total_loss, correct = 0.0, 0
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            batch_loss = float(loss.detach())
            total_loss += batch_loss * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            done += 1
            if report is not None:
                report(ProgressEvent("training", done, epochs * n_batches,
                                     f"epoch {epoch + 1}/{epochs} loss {batch_loss:.3f}",
                                     done=done == epochs * n_batches))
        history.loss.append(total_loss / len(x))
        history.train_accuracy.append(correct / len(x))
        history.seconds.append(time.perf_counter() - start)
        if on_epoch is not None:
            on_epoch(epoch, history)
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for ``x`` (optionally transformed batch by batch, e.g. stamped)."""
    out = []
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if transform is not None:
                xb = transform(xb)
            out.append(model(xb).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             trigger: Trigger | None = None) -> dict[str, Any]:
    """Clean accuracy, and the attack success rate of ``trigger`` when one is given."""
    result: dict[str, Any] = {"clean_accuracy": clean_accuracy(predict(model, x), y),
                              "attack_success_rate": None}
    if trigger is not None:  # a multi-target trigger: each part's rate, and the weakest as the rate
        rates = [attack_success_rate(predict(model, x, transform=part.apply), y, part.intended(y))
                 for part in trigger.parts()]
        result["attack_success_rate"] = min(rates)
        if len(rates) > 1:
            result["attack_success_rates"] = rates
    return result
