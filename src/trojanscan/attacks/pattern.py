"""Pixel and pattern backdoors (the survey's MNIST figure; ART's ``add_single_bd``/``add_pattern_bd``).

``shape="pixel"`` sets one pixel ``distance`` rows and columns in from the bottom-right corner;
``shape="checker"`` sets four pixels that form a small checker near that corner: counting rows and
columns from the bottom-right as -1, at (-d, -d), (-d-1, -d-1), (-d, -d-2) and (-d-2, -d) with
``d = distance`` (ART's default d = 2 gives (-2, -2), (-3, -3), (-2, -4), (-4, -2)). All-to-one
like BadNets.

ART's helpers index images channels-last (N×H×W×C or N×H×W) unless told otherwise, so on an
N×C×H×W batch they mark the wrong axis; here the trigger is a C×H×W mask and pattern, and the
pixels are set to ``value`` on every channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.base import PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError

SHAPES = ("pixel", "checker")


@dataclass(frozen=True)
class PatternOptions:
    """The pixel/pattern trigger's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1
    shape: str = "checker"  # pixel or checker ("kind" would clash with make_attack's own keyword)
    distance: int = 2  # rows/columns in from the bottom-right edge (ART's default; 1 = the corner)
    value: float = 1.0  # the pixels' value on every channel (ART's pixel_value)
    seed: int = 0


def pattern_pixels(shape: str, distance: int) -> list[tuple[int, int]]:
    """The trigger's (row, col) offsets from the bottom-right, in negative indices (-1 = last)."""
    d = distance
    if shape == "pixel":
        return [(-d, -d)]
    return [(-d, -d), (-d - 1, -d - 1), (-d, -d - 2), (-d - 2, -d)]


class Pattern(PoisoningAttack):
    """One pixel or ART's 4-pixel checker near the bottom-right corner, set to ``value``."""

    name = "pattern"
    title = "pixel / pattern"
    options_type = PatternOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, shape: str = "checker", distance: int = 2,
                 value: float = 1.0, seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        if shape not in SHAPES:
            raise TrojanscanError(f"unknown pattern shape {shape!r}; use one of {', '.join(SHAPES)}")
        if isinstance(distance, bool) or not isinstance(distance, int) or distance < 1:
            raise TrojanscanError(f"pattern distance must be an integer >= 1, got {distance!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise TrojanscanError(f"pattern value must be in [0, 1], got {value!r}")
        self.shape, self.distance, self.value = shape, int(distance), float(value)

    def params(self) -> dict:
        return {**super().params(), "shape": self.shape, "distance": self.distance, "value": self.value}

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        c, h, w = input_shape
        pixels = pattern_pixels(self.shape, self.distance)
        reach = max(-min(r for r, _ in pixels), -min(col for _, col in pixels))
        if reach > min(h, w):
            raise TrojanscanError(f"a {self.shape} trigger at distance {self.distance} does not fit "
                                  f"{h}×{w} images")
        mask = torch.zeros(h, w)
        for r, col in pixels:
            mask[h + r, w + col] = 1
        return Trigger(mask, mask.expand(c, h, w) * self.value, self.target, kind="pattern",
                       params={**self.params(), "pixels": [[h + r, w + col] for r, col in pixels]})
