"""Blended (invisible) trigger (Chen et al.): ``x' = (1 - α)·x + α·pattern`` over the whole image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.base import PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError

PATTERNS = ("noise", "stripes")


@dataclass(frozen=True)
class BlendOptions:
    """The blended trigger's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1
    alpha: float = 0.2  # opacity of the pattern
    pattern: str = "noise"  # noise or stripes
    seed: int = 0


class Blend(PoisoningAttack):
    """Whole-image pattern mixed in with opacity ``alpha``."""

    name = "blend"
    title = "blended trigger"
    options_type = BlendOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, alpha: float = 0.2,
                 pattern: str = "noise", seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        if not 0 < alpha <= 1:
            raise TrojanscanError(f"blend opacity alpha must be in (0, 1], got {alpha}")
        if pattern not in PATTERNS:
            raise TrojanscanError(f"unknown blend pattern {pattern!r}; use {', '.join(PATTERNS)}")
        self.alpha, self.pattern = float(alpha), pattern

    def params(self) -> dict:
        return {**super().params(), "alpha": self.alpha, "pattern": self.pattern}

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        c, h, w = input_shape
        if self.pattern == "noise":
            gen = torch.Generator().manual_seed(self.seed + 1)
            pattern = torch.rand(c, h, w, generator=gen)
        else:
            pattern = ((torch.arange(w) // 2) % 2).float().expand(c, h, w).clone()
        mask = torch.full((h, w), self.alpha)
        return Trigger(mask, pattern, self.target, kind="blend", params=self.params())
