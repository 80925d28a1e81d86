"""BadNets (Gu et al.): a small patch stamped in a corner, all-to-one."""

from __future__ import annotations

import torch

from trojanscan.attacks.base import PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
COLORS = ("white", "black", "random", "checker")


def patch_origin(position: str | tuple[int, int], size: int, height: int, width: int,
                 margin: int) -> tuple[int, int]:
    """Top-left (row, col) of a ``size``×``size`` patch at a named corner or explicit place."""
    if isinstance(position, tuple):
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


class BadNets(PoisoningAttack):
    """Patch trigger: ``size``×``size`` pixels of a colour or a seeded random pattern."""

    name = "badnets"

    def __init__(self, target: int = 0, poison_rate: float = 0.1, size: int = 4,
                 position: str | tuple[int, int] = "bottom-right", color: str = "white",
                 margin: int = 1, seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        if size < 1:
            raise TrojanscanError(f"trigger size must be >= 1, got {size}")
        if color not in COLORS:
            raise TrojanscanError(f"unknown trigger colour {color!r}; use one of {', '.join(COLORS)}")
        self.size, self.position, self.color, self.margin = int(size), position, color, int(margin)

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
