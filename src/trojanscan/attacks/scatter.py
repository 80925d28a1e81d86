"""Scattered-pixel trigger: ``pixels`` single pixels at seeded random places over the whole image.

The case Neural Cleanse handles worst (its L1 search prefers a compact blob) and TABOR's smoothness
term targets; all-to-one like BadNets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.base import PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError

COLORS = ("white", "black", "random")


@dataclass(frozen=True)
class ScatterOptions:
    """The scattered-pixel trigger's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1
    pixels: int = 16
    color: str = "random"  # white, black or random
    seed: int = 0


class Scatter(PoisoningAttack):
    """``pixels`` isolated trigger pixels, white, black or a seeded random 0/1 per channel."""

    name = "scatter"
    title = "scattered pixels"
    options_type = ScatterOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, pixels: int = 16, color: str = "random",
                 seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        if pixels < 1:
            raise TrojanscanError(f"a scattered trigger needs at least 1 pixel, got {pixels}")
        if color not in COLORS:
            raise TrojanscanError(f"unknown trigger colour {color!r}; use one of {', '.join(COLORS)}")
        self.pixels, self.color = int(pixels), color

    def params(self) -> dict:
        return {**super().params(), "pixels": self.pixels, "color": self.color}

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        c, h, w = input_shape
        if self.pixels > h * w:
            raise TrojanscanError(f"{self.pixels} trigger pixels do not fit {h}×{w} images")
        gen = torch.Generator().manual_seed(self.seed + 2)
        where = torch.randperm(h * w, generator=gen)[:self.pixels]
        mask = torch.zeros(h * w)
        mask[where] = 1
        if self.color == "random":
            pattern = torch.randint(0, 2, (c, h * w), generator=gen).float()
        else:
            pattern = torch.full((c, h * w), 1.0 if self.color == "white" else 0.0)
        pattern = pattern * mask
        return Trigger(mask.view(h, w), pattern.view(c, h, w), self.target, kind="scatter",
                       params=self.params())
