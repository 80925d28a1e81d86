"""The shared chore of every data-poisoning attack: stamp a seeded, exact share of training images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError


@dataclass
class PoisonedData:
    """Training data after poisoning, with the indices that were stamped and relabelled."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned_indices: torch.Tensor


class PoisoningAttack(ABC):
    """All-to-one poisoning: ``round(poison_rate · N)`` non-target images get the trigger and the
    target label, in place (the training set keeps its size)."""

    name = "attack"

    def __init__(self, target: int = 0, poison_rate: float = 0.1, seed: int = 0) -> None:
        if not 0 < poison_rate < 1:
            raise TrojanscanError(f"poison rate must be in (0, 1), got {poison_rate}")
        if target < 0:
            raise TrojanscanError(f"target label must be >= 0, got {target}")
        self.target = int(target)
        self.poison_rate = float(poison_rate)
        self.seed = int(seed)

    @abstractmethod
    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        """The trigger this attack plants, for images of ``input_shape``."""

    def params(self) -> dict:
        """The attack's settings, for result files."""
        return {"attack": self.name, "target": self.target, "poison_rate": self.poison_rate,
                "seed": self.seed}

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int,
               trigger: Trigger | None = None) -> PoisonedData:
        """Return a poisoned copy of ``(x, y)``; the inputs are not modified."""
        if self.target >= num_classes:
            raise TrojanscanError(
                f"target label {self.target} is outside the data's labels 0..{num_classes - 1}")
        trigger = trigger or self.make_trigger(tuple(x.shape[1:]))  # type: ignore[arg-type]
        candidates = torch.nonzero(y != self.target).flatten()
        count = round(self.poison_rate * len(x))
        if count < 1:
            raise TrojanscanError(
                f"poison rate {self.poison_rate} of {len(x)} images poisons none; raise it")
        if count > len(candidates):
            raise TrojanscanError(
                f"poison rate {self.poison_rate} asks for {count} images but only "
                f"{len(candidates)} are not of the target label")
        gen = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
        x_p, y_p = x.clone(), y.clone()
        x_p[chosen] = trigger.apply(x[chosen])
        y_p[chosen] = self.target
        return PoisonedData(x_p, y_p, chosen)
