"""Wrappers that let any model be scanned in [0, 1] pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.models.architectures import Normalize


class NormalizedInput(nn.Module):
    """Put ``(x - mean) / std`` in front of a model that expects normalised inputs.

    Trigger searches then happen on [0, 1] images, as the person reading the report sees them.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class ExpectsNormalised(nn.Module):
    """The reverse of :class:`NormalizedInput`: a [0, 1] model made to take ``(x - mean) / std``, as
    models from other training code often do (the zoo uses it to make such models)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z * self.std + self.mean)


PLAIN_CONVENTION = "[0, 1] pixels (normalisation, if any, inside the model)"


def wrap_normalization(model: nn.Module, mean: Sequence[float] | None,
                       std: Sequence[float] | None, channels: int) -> tuple[nn.Module, str]:
    """Wrap ``model`` when mean/std are given; returns the model and the input convention used."""
    if mean is None and std is None:
        return model, PLAIN_CONVENTION
    if mean is None or std is None:
        raise TrojanscanError("--mean and --std go together: give both or neither")
    if {len(mean), len(std)} - {1, channels}:
        counts = "1 value" if channels == 1 else f"1 or {channels} values"
        raise TrojanscanError(f"--mean/--std need {counts} for {channels}-channel images, got "
                              f"{len(mean)} and {len(std)}")
    mean = list(mean) * channels if len(mean) == 1 else list(mean)
    std = list(std) * channels if len(std) == 1 else list(std)
    return NormalizedInput(model, mean, std), f"[0, 1] pixels, then (x - {mean}) / {std} before the model"
