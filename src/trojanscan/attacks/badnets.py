"""BadNets (Gu et al.): a small patch stamped in a corner, all-to-one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.base import PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
COLORS = ("white", "black", "random", "checker")


def parse_position(position: str | tuple[int, int] | list[int]) -> str | tuple[int, int]:
    """A named place as it is, ``"ROW,COL"`` or a pair as ``(row, col)``."""
    if isinstance(position, str) and "," in position:
        try:
            position = [int(v) for v in position.split(",")]
        except ValueError:
            raise TrojanscanError(f"trigger position {position!r}: expected ROW,COL or a name") from None
    if isinstance(position, (tuple, list)):
        if len(position) != 2 or not all(isinstance(v, int) for v in position):
            raise TrojanscanError(f"trigger position {position!r}: expected ROW,COL")
        return int(position[0]), int(position[1])
    return position


def patch_origin(position: str | tuple[int, int], size: int, height: int, width: int,
                 margin: int) -> tuple[int, int]:
    """Top-left (row, col) of a ``size``×``size`` patch at a named corner or explicit place
    (a ``(row, col)`` pair or the text ``"ROW,COL"``)."""
    position = parse_position(position)
    if isinstance(position, tuple):
        if len(position) != 2:
            raise TrojanscanError(f"trigger position {position!r}: expected ROW,COL")
        row, col = position
    elif position == "bottom-right":
        row, col = height - margin - size, width - margin - size
    elif position == "bottom-left":
        row, col = height - margin - size, margin
    elif position == "top-right":
        row, col = margin, width - margin - size
    elif position == "top-left":
        row, col = margin, margin
    elif position == "center":
        row, col = (height - size) // 2, (width - size) // 2
    else:
        raise TrojanscanError(
            f"unknown trigger position {position!r}; use one of {', '.join(POSITIONS)} or ROW,COL")
    if row < 0 or col < 0 or row + size > height or col + size > width:
        raise TrojanscanError(
            f"a {size}×{size} trigger at {position} does not fit {height}×{width} images")
    return int(row), int(col)


@dataclass(frozen=True)
class BadNetsOptions:
    """BadNets' settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1
    size: int = 4  # patch side in pixels
    position: str | tuple[int, int] = "bottom-right"  # a corner, "center" or "ROW,COL"
    color: str = "white"  # white, black, random or checker
    margin: int = 1  # pixels between a corner patch and the border
    seed: int = 0


class BadNets(PoisoningAttack):
    """Patch trigger: ``size``×``size`` pixels of a colour or a seeded random pattern."""

    name = "badnets"
    title = "BadNets patch"
    options_type = BadNetsOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, size: int = 4,
                 position: str | tuple[int, int] = "bottom-right", color: str = "white",
                 margin: int = 1, seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        if size < 1:
            raise TrojanscanError(f"trigger size must be >= 1, got {size}")
        if color not in COLORS:
            raise TrojanscanError(f"unknown trigger colour {color!r}; use one of {', '.join(COLORS)}")
        self.size, self.color, self.margin = int(size), color, int(margin)
        self.position = parse_position(position)

    def params(self) -> dict:
        return {**super().params(), "size": self.size, "position": self.position,
                "color": self.color, "margin": self.margin}

    def _patch(self, channels: int) -> torch.Tensor:
        s = self.size
        if self.color == "white":
            return torch.ones(channels, s, s)
        if self.color == "black":
            return torch.zeros(channels, s, s)
        if self.color == "checker":
            grid = (torch.arange(s).view(-1, 1) + torch.arange(s).view(1, -1)) % 2
            return grid.float().expand(channels, s, s).clone()
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randint(0, 2, (channels, s, s), generator=gen).float()

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        c, h, w = input_shape
        row, col = patch_origin(self.position, self.size, h, w, self.margin)
        mask = torch.zeros(h, w)
        pattern = torch.zeros(c, h, w)
        mask[row:row + self.size, col:col + self.size] = 1
        pattern[:, row:row + self.size, col:col + self.size] = self._patch(c)
        return Trigger(mask, pattern, self.target, kind="patch",
                       params={**self.params(), "origin": [row, col]})
