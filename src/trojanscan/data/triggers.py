"""Triggers as (mask, pattern, target): stamping, and saving them beside a model.

Every trigger in trojanscan, planted or reverse-engineered, uses the Neural Cleanse injection
``x' = (1 - m) ⊙ x + m ⊙ Δ`` with an H×W mask ``m`` in [0, 1] shared across channels and a C×H×W
pattern ``Δ`` in [0, 1]. A patch is a 0/1 mask; a blended trigger is a constant mask α. An additive
trigger (SIG's sinusoid) also has a C×H×W ``offset`` in [-1, 1], added after the blend and clipped:
``x' = clip((1 - m) ⊙ x + m ⊙ Δ + offset, 0, 1)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import load_npz_record, parse_json, save_npz_record

TRIGGER_SUFFIX = ".trigger.npz"


@dataclass
class Trigger:
    """A trigger and the label it sends inputs to."""

    mask: torch.Tensor  # H×W, float32 in [0, 1]
    pattern: torch.Tensor  # C×H×W, float32 in [0, 1]
    target: int
    kind: str = "patch"
    params: dict[str, Any] = field(default_factory=dict)
    offset: torch.Tensor | None = None  # C×H×W in [-1, 1], added and clipped after the blend

    def __post_init__(self) -> None:
        self.mask = torch.as_tensor(self.mask, dtype=torch.float32)
        self.pattern = torch.as_tensor(self.pattern, dtype=torch.float32)
        if self.mask.dim() != 2 or self.pattern.dim() != 3:
            raise TrojanscanError(
                f"trigger mask must be H×W and pattern C×H×W, got {tuple(self.mask.shape)} and "
                f"{tuple(self.pattern.shape)}")
        if self.pattern.shape[1:] != self.mask.shape:
            raise TrojanscanError(
                f"trigger mask {tuple(self.mask.shape)} and pattern {tuple(self.pattern.shape)} "
                "differ in size")
        for name, t in (("mask", self.mask), ("pattern", self.pattern)):
            if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
                raise TrojanscanError(f"trigger {name} must be finite and within [0, 1]")
        if self.offset is not None:
            self.offset = torch.as_tensor(self.offset, dtype=torch.float32)
            if self.offset.shape != self.pattern.shape:
                raise TrojanscanError(f"trigger offset {tuple(self.offset.shape)} and pattern "
                                      f"{tuple(self.pattern.shape)} differ in size")
            if not torch.isfinite(self.offset).all() or self.offset.abs().max() > 1:
                raise TrojanscanError("trigger offset must be finite and within [-1, 1]")
        self.target = int(self.target)

    @property
    def all_to_all(self) -> bool:
        """Whether the trigger sends label ``i`` to ``(i + shift) mod K`` instead of one target."""
        return self.params.get("mapping") == "all-to-all"

    @property
    def targets(self) -> list[int]:
        """Every label the trigger sends inputs to: one, or each part's of a multi-target trigger."""
        if not self.multi_target:
            return [self.target]
        return sorted({int(p["target"]) for p in self.params["parts"]})

    @property
    def multi_target(self) -> bool:
        """Whether the trigger is several patches, each with its own target (see :meth:`parts`)."""
        return self.params.get("mapping") == "multi-target"

    def parts(self) -> list[Trigger]:
        """Each patch of a multi-target trigger as a trigger of its own (a plain trigger: itself)."""
        if not self.multi_target:
            return [self]
        out = []
        for part in self.params["parts"]:
            (row, col), size = part["origin"], int(part["size"])
            box = torch.zeros_like(self.mask)
            box[row:row + size, col:col + size] = 1
            out.append(Trigger(self.mask * box, self.pattern * box, int(part["target"]), self.kind,
                               {k: v for k, v in part.items()}))
        return out

    def apply_in_turn(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp a batch as the backdoor is used: with a multi-target trigger, input i carries part
        i mod n alone (both patches at once send an input to neither target for sure); otherwise
        :meth:`apply`."""
        parts = self.parts()
        if len(parts) == 1:
            return self.apply(x)
        out = x.clone()
        for k, part in enumerate(parts):
            out[k::len(parts)] = part.apply(x[k::len(parts)])
        return out

    def intended_in_turn(self, labels: torch.Tensor) -> torch.Tensor:
        """The label each input of true label ``labels`` is sent to when stamped by :meth:`apply_in_turn`."""
        parts = self.parts()
        if len(parts) == 1:
            return self.intended(labels)
        out = labels.clone()
        for k, part in enumerate(parts):
            out[k::len(parts)] = part.target
        return out

    def intended(self, labels: torch.Tensor) -> torch.Tensor:
        """The label each input of true label ``labels`` is sent to when stamped."""
        if self.all_to_all:
            k = int(self.params["num_classes"])
            return (labels + int(self.params.get("shift", 1))) % k
        return torch.full_like(labels, self.target)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.pattern.shape)  # type: ignore[return-value]

    @property
    def area(self) -> float:
        """L1 norm of the mask: the number of pixels a patch covers."""
        return float(self.mask.sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp a batch N×C×H×W (or one C×H×W image) in [0, 1]."""
        if x.shape[-3:] != self.pattern.shape:
            raise TrojanscanError(
                f"trigger is for images {tuple(self.pattern.shape)} but got {tuple(x.shape[-3:])}")
        m = self.mask.to(x.device, x.dtype)
        out = (1 - m) * x + m * self.pattern.to(x.device, x.dtype)
        if self.offset is not None:
            out = (out + self.offset.to(x.device, x.dtype)).clamp(0, 1)
        return out

    def check_compatible(self, input_shape: tuple[int, ...], num_classes: int, source: str) -> None:
        """Refuse a trigger made for other images or a target outside the label range."""
        if tuple(input_shape) != self.input_shape:
            raise TrojanscanError(
                f"{source}: trigger is for images {self.input_shape} but the data has "
                f"{tuple(input_shape)}")
        if not 0 <= self.target < num_classes:
            raise TrojanscanError(
                f"{source}: trigger target {self.target} is outside the labels 0..{num_classes - 1}")

    def save(self, path: str | os.PathLike) -> None:
        """Save as an ``.npz`` of plain arrays (no pickles), atomically."""
        arrays = {"mask": self.mask.numpy(), "pattern": self.pattern.numpy(),
                  "target": np.int64(self.target), "kind": self.kind, "params": json.dumps(self.params)}
        if self.offset is not None:
            arrays["offset"] = self.offset.numpy()
        save_npz_record(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trigger:
        """Read a trigger saved by :meth:`save`; never unpickles."""
        z = load_npz_record(path, "trigger", ("mask", "pattern", "target"), sealed=False)
        try:
            kind = str(z["kind"]) if "kind" in z else "patch"
            params = parse_json(str(z["params"]), path, "trigger parameters") if "params" in z else {}
            offset = torch.from_numpy(z["offset"].astype(np.float32)) if "offset" in z else None
            return cls(torch.from_numpy(z["mask"].astype(np.float32)),
                       torch.from_numpy(z["pattern"].astype(np.float32)),
                       int(z["target"]), kind, params, offset)
        except TrojanscanError:
            raise
        except Exception as e:  # wrong dtypes or shapes in a damaged file
            raise TrojanscanError(f"{path}: not a trigger file ({type(e).__name__}: {e})") from None


def trigger_path_for(model_path: str | os.PathLike) -> Path:
    """Where the ground-truth trigger of a trained model lives: ``model.trigger.npz``."""
    p = Path(model_path)
    return p.with_name(p.stem + TRIGGER_SUFFIX)


def stamp_each(x: torch.Tensor, triggers: list[Trigger]) -> torch.Tensor:
    """Stamp image i with trigger ``i mod len(triggers)`` (several triggers share the images)."""
    if not triggers:
        raise TrojanscanError("no trigger to stamp")
    out = x.clone()
    for k, trig in enumerate(triggers):
        out[k::len(triggers)] = trig.apply(x[k::len(triggers)])
    return out
