"""Two-target BadNets: two different patches, each sending every other label to its own target — a
multi-target backdoor, which a verdict must report with both targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import PoisonedData
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError


@dataclass(frozen=True)
class TwoTargetOptions:
    """The two patches' settings (the constructor's keywords)."""

    target: int = 0
    second_target: int = 1
    poison_rate: float = 0.1  # in all, shared evenly by the two patches
    size: int = 4
    position: str | tuple[int, int] = "bottom-right"
    second_position: str | tuple[int, int] = "top-left"
    color: str = "white"
    margin: int = 1
    seed: int = 0


class TwoTarget(BadNets):
    """Patch A at ``position`` → ``target``; patch B at ``second_position`` → ``second_target``."""

    name = "two-target"
    title = "two-target patches"
    options_type = TwoTargetOptions

    def __init__(self, target: int = 0, second_target: int = 1, poison_rate: float = 0.1, size: int = 4,
                 position: str | tuple[int, int] = "bottom-right",
                 second_position: str | tuple[int, int] = "top-left", color: str = "white",
                 margin: int = 1, seed: int = 0) -> None:
        super().__init__(target, poison_rate, size, position, color, margin, seed)
        self.second = BadNets(second_target, poison_rate, size, second_position, color, margin, seed + 7)
        if self.second.target == self.target:
            raise TrojanscanError(f"the two targets must differ, got {target} twice")
        self.second_target, self.second_position = self.second.target, self.second.position

    def params(self) -> dict:
        return {**super().params(), "second_target": self.second_target,
                "second_position": self.second_position}

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        first = super().make_trigger(input_shape)
        second = self.second.make_trigger(input_shape)
        if (first.mask * second.mask).sum() > 0:
            raise TrojanscanError(f"the two {self.size}×{self.size} patches at {self.position} and "
                                  f"{self.second_position} overlap; place them apart")
        parts = [{"target": t.target, "origin": t.params["origin"], "size": self.size}
                 for t in (first, second)]
        return Trigger(first.mask + second.mask, first.pattern + second.pattern, self.target, kind="patch",
                       params={**self.params(), "mapping": "multi-target", "parts": parts})

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int,
               trigger: Trigger | None = None) -> PoisonedData:
        """Half the poisoned images get patch A and label ``target``, half patch B and ``second_target``."""
        for t in (self.target, self.second_target):
            if t >= num_classes:
                raise TrojanscanError(f"target label {t} is outside the data's labels 0..{num_classes - 1}")
        trigger = trigger or self.make_trigger(tuple(x.shape[1:]))  # type: ignore[arg-type]
        parts = trigger.parts()
        total = round(self.poison_rate * len(x))
        if total < len(parts):
            raise TrojanscanError(
                f"poison rate {self.poison_rate} of {len(x)} images poisons too few; raise it")
        gen = torch.Generator().manual_seed(self.seed)
        free = torch.ones(len(x), dtype=torch.bool)
        x_p, y_p, chosen_all = x.clone(), y.clone(), []
        for k, part in enumerate(parts):
            count = total // len(parts) + (k < total % len(parts))
            candidates = torch.nonzero(free & (y != part.target)).flatten()
            if count > len(candidates):
                raise TrojanscanError(f"poison rate {self.poison_rate} asks for {count} images per patch "
                                      f"but only {len(candidates)} are free")
            chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]]
            x_p[chosen] = part.apply(x[chosen])
            y_p[chosen] = part.target
            free[chosen] = False
            chosen_all.append(chosen)
        return PoisonedData(x_p, y_p, torch.cat(chosen_all).sort().values)
