"""The contracts every defence follows.

- A **trigger reverser** answers "which label can an input-agnostic trigger force?" with
  ``scan(model, x, y=None, *, num_classes, labels=None, out_dir=None, provenance=None) ->
  ScanResult`` (Neural Cleanse, TABOR).
- A **model inspector** gathers evidence about a whole model for the verdict: ``inspect(model, x=None,
  y=None, *, num_classes, input_shape)`` (MM-BD, the label-pair search).
- An **input guard** screens inputs at run time: ``fit(x, ...) -> self``, ``detect(x)`` (True =
  rejected), ``predict(x)`` (labels and flags), ``save(path)`` and ``load(path, model)`` (STRIP,
  the input filter).

Each class declares its ``name`` (the registry key, see ``defenses.registry``), its settings as a
frozen ``options_type`` dataclass whose fields are the constructor's keywords, and, for reversers,
the extra per-label scores it adds to a scan (``label_scores``) so that the CLI and the report can
show them without naming the method.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trojanscan.defenses.scan_result import ScanResult
from trojanscan.models.wrappers import PLAIN_CONVENTION


@dataclass(frozen=True)
class Provenance:
    """Where a scan's inputs came from, recorded in its result (hashes default to the tensors')."""

    model_sha256: str | None = None
    data_sha256: str | None = None
    input_convention: str = PLAIN_CONVENTION
    precision: str = "float32"  # the model's arithmetic during the scan (``--precision``)


@dataclass(frozen=True)
class LabelScore:
    """An extra per-label score a reverser reports: its key in ``LabelResult.extra`` and a title."""

    key: str
    title: str


class Defence:
    """What every defence declares: a registry ``name``, a ``title`` for people, its options."""

    name: ClassVar[str]
    title: ClassVar[str]
    options_type: ClassVar[type]

    def options(self) -> Any:
        """The current settings as the method's frozen options dataclass."""
        return self.options_type(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(self.options_type)})


class TriggerReverser(Defence, ABC):
    """Reverse-engineers a candidate trigger per label and flags the labels whose trigger is abnormal."""

    label_scores: ClassVar[tuple[LabelScore, ...]] = ()
    #: key of a model-level summary in ``ScanResult.extra`` with its own ``flagged_labels`` (or None)
    outlier_summary: ClassVar[str | None] = None

    @classmethod
    def summarise(cls, result: ScanResult) -> None:
        """Recompute the method's model-level summary from the per-label scores (after the labels of
        partial scans were merged); nothing for a method without one."""

    @abstractmethod
    def scan(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
             num_classes: int, labels: list[int] | None = None, out_dir: str | Path | None = None,
             provenance: Provenance | None = None) -> ScanResult:
        """Scan ``model`` with clean images ``x`` (N×C×H×W in [0, 1]) and optional labels ``y``."""


class ModelInspector(Defence, ABC):
    """Evidence about a whole model that is not a per-label trigger (MM-BD's margins, the label-pair
    search): ``inspect(model, x, y, *, num_classes, input_shape)`` returns an object with
    ``to_dict()``; ``x``/``y`` are clean images and labels for inspectors that need data."""

    needs_data: ClassVar[bool] = False

    @abstractmethod
    def inspect(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                num_classes: int, input_shape: tuple[int, ...]) -> Any:
        """Examine ``model``; returns the method's evidence record."""


class InputGuard(Defence, ABC):
    """Flags inputs that carry a trigger, calibrated on benign inputs only."""

    @abstractmethod
    def fit(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> InputGuard:
        """Calibrate on benign images ``x``; returns ``self``."""

    @abstractmethod
    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean flags, True where an input is rejected."""

    @abstractmethod
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for ``x`` and the guard's flags."""

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as a plain-array ``.npz``."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> InputGuard:
        """Read a calibration written by :meth:`save` for ``model``; never unpickles."""
