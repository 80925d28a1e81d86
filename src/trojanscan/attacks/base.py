"""The two kinds of attack, in the spirit of ART's split.

- A **poisoning attack** changes data: ``poison(x, y, num_classes) -> PoisonedData`` stamps a
  seeded, exact share of training images, and a model is then trained on them (BadNets, blended,
  scattered pixels).
- A **model attack** starts from a trained model: ``apply(model, data) -> AttackedModel`` returns a
  changed copy and the trigger it responds to (fine-tuning injection; TrojanNN, bit flips and the
  transfer-learning backdoor take this shape).

Each class declares its registry ``name`` and its settings as a frozen ``options_type`` dataclass
whose fields are the constructor's keywords, so the CLI builds it without naming it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError


@dataclass
class PoisonedData:
    """Training data after poisoning, with the indices that were stamped and relabelled."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned_indices: torch.Tensor


class Attack:
    """What every attack declares: a registry ``name``, a ``title`` for people, its options."""

    name: ClassVar[str] = "attack"
    title: ClassVar[str] = "attack"
    options_type: ClassVar[type]

    def options(self) -> Any:
        """The current settings as the attack's frozen options dataclass."""
        return self.options_type(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(self.options_type)})

    def params(self) -> dict[str, Any]:
        """The attack's settings, for result files."""
        return {"attack": self.name, **dataclasses.asdict(self.options())}


def check_target_and_rate(target: Any, poison_rate: Any) -> None:
    """The target label is a non-negative integer and the poison rate a fraction in (0, 1)."""
    if isinstance(poison_rate, bool) or not isinstance(poison_rate, (int, float)) or not 0 < poison_rate < 1:
        raise TrojanscanError(f"poison rate must be in (0, 1), got {poison_rate}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise TrojanscanError(f"target label must be an integer >= 0, got {target}")


class PoisoningAttack(Attack, ABC):
    """All-to-one poisoning: ``round(poison_rate · N)`` non-target images get the trigger and the
    target label, in place (the training set keeps its size)."""

    def __init__(self, target: int = 0, poison_rate: float = 0.1, seed: int = 0) -> None:
        check_target_and_rate(target, poison_rate)
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
        candidates = torch.nonzero(self._relabel(y, num_classes, trigger) != y).flatten()
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
        y_p[chosen] = self._relabel(y[chosen], num_classes, trigger)
        return PoisonedData(x_p, y_p, chosen)

    def _relabel(self, y: torch.Tensor, num_classes: int, trigger: Trigger) -> torch.Tensor:
        """The labels stamped images of true labels ``y`` get: the target (all-to-one)."""
        return torch.full_like(y, self.target)


class AttackedModel(NamedTuple):
    """What a model attack returns: the changed model (a copy) and the trigger it now obeys."""

    model: nn.Module
    trigger: Trigger


class ModelAttack(Attack, ABC):
    """An attack on a trained model: ``apply(model, data)`` leaves ``model`` untouched and returns
    an attacked copy with its trigger; what it measured on the way is in ``report_``."""

    report_: dict[str, Any]
    # an attack that leaves the model 8-bit quantised: each quantised weight's step, by state name
    int8_steps_: dict[str, float] | None = None

    @abstractmethod
    def apply(self, model: nn.Module, data: Dataset) -> AttackedModel:
        """Attack a copy of ``model`` with the attacker's ``data``; returns the copy and its trigger."""
