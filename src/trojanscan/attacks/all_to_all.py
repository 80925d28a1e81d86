"""All-to-all BadNets (Gu et al.): the same patch sends every label ``i`` to ``(i + shift) mod K``, so
no single label is the target — the case a per-label trigger search cannot see and a label-pair
(source-specific) search is for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.badnets import BadNets
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError


@dataclass(frozen=True)
class AllToAllOptions:
    """The all-to-all patch's settings (the constructor's keywords)."""

    poison_rate: float = 0.1
    shift: int = 1  # label i goes to (i + shift) mod K
    size: int = 4
    position: str | tuple[int, int] = "bottom-right"
    color: str = "white"
    margin: int = 1
    seed: int = 0


class AllToAll(BadNets):
    """A BadNets patch whose stamped images of label ``i`` are relabelled ``(i + shift) mod K``."""

    name = "all-to-all"
    title = "all-to-all patch"
    options_type = AllToAllOptions

    def __init__(self, poison_rate: float = 0.1, shift: int = 1, size: int = 4,
                 position: str | tuple[int, int] = "bottom-right", color: str = "white",
                 margin: int = 1, seed: int = 0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 1:
            raise TrojanscanError(f"all-to-all shift must be an integer >= 1, got {shift!r}")
        super().__init__(shift, poison_rate, size, position, color, margin, seed)
        self.shift = shift

    def params(self) -> dict:
        return {**super().params(), "mapping": "all-to-all", "shift": self.shift}

    def _relabel(self, y: torch.Tensor, num_classes: int, trigger: Trigger) -> torch.Tensor:
        if self.shift % num_classes == 0:
            raise TrojanscanError(f"shift {self.shift} maps every label to itself with {num_classes} classes")
        trigger.params.update(mapping="all-to-all", shift=self.shift, num_classes=num_classes)
        return (y + self.shift) % num_classes
