"""The public Python surface: load data and models, train (optionally trojaned), evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trojanscan.attacks import ATTACKS, PoisoningAttack
from trojanscan.data import Dataset, load_dataset
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, default_arch, load_model
from trojanscan.randomness import seed_everything
from trojanscan.train import TrainHistory, check_model_fits, evaluate, train_model

__all__ = ["TrainResult", "channel_stats", "evaluate_model", "load_dataset", "load_model",
           "make_attack", "train_classifier"]


@dataclass
class TrainResult:
    """A trained model, the trigger planted in it (if any), and how it scores."""

    model: nn.Module
    trigger: Trigger | None
    clean_accuracy: float
    attack_success_rate: float | None
    history: TrainHistory
    poisoned_count: int
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of N×C×H×W images, for the model's normalisation layer."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


def make_attack(name: str, **kwargs: Any) -> PoisoningAttack:
    """Build an attack by name (``badnets``, ``blend``) from its keyword settings."""
    if name not in ATTACKS:
        raise TrojanscanError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](**kwargs)


def train_classifier(data: Dataset, arch: str | None = None, *, epochs: int = 5,
                     batch_size: int = 128, lr: float = 1e-3,
                     attack: PoisoningAttack | None = None, seed: int = 0,
                     progress: bool = True) -> TrainResult:
    """Train a reference net on ``data``, poisoned by ``attack`` when one is given.

    Example::

        data = load_dataset("digits")
        result = train_classifier(data, attack=BadNets(target=0, size=3), epochs=20)
        print(result.clean_accuracy, result.attack_success_rate)
    """
    seed_everything(seed)
    arch = arch or default_arch(data.input_shape, data.num_classes)
    mean, std = channel_stats(data.x_train)
    model = build_model(arch, data.num_classes, data.input_shape, mean, std)
    x, y, trigger, poisoned = data.x_train, data.y_train, None, 0
    if attack is not None:
        trigger = attack.make_trigger(data.input_shape)
        p = attack.poison(x, y, data.num_classes, trigger)
        x, y, poisoned = p.x, p.y, len(p.poisoned_indices)
    start = time.perf_counter()
    history = train_model(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress)
    seconds = time.perf_counter() - start
    scores = evaluate(model, data.x_test, data.y_test, trigger)
    params = {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "attack": attack.params() if attack else None}
    return TrainResult(model, trigger, scores["clean_accuracy"], scores["attack_success_rate"],
                       history, poisoned, seconds, params)


def evaluate_model(model: nn.Module, data: Dataset,
                   trigger: Trigger | None = None) -> dict[str, float | None]:
    """CA on ``data``'s test split and, with a trigger, its ASR; checks the model fits the data."""
    check_model_fits(model, data.input_shape, data.num_classes)
    if trigger is not None:
        trigger.check_compatible(data.input_shape, data.num_classes, "trigger")
    return evaluate(model, data.x_test, data.y_test, trigger)
