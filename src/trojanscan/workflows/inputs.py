"""Resolving what a workflow runs on: the data, the model (a file or a module) with its input
convention, and the named held-out subsets each job draws from.

A model that expects normalised inputs is declared once, with ``mean``/``std``: it is wrapped so that
every defence works on [0, 1] pictures, and a repaired copy is saved without the wrapper, so it keeps
the convention it came with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trojanscan.data import Dataset, load_dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.errors import TrojanscanError
from trojanscan.models import LoadedModel, load_model
from trojanscan.models.wrappers import PLAIN_CONVENTION, NormalizedInput, wrap_normalization
from trojanscan.validation import check_model_fits

ModelLike = nn.Module | str | os.PathLike
DataLike = Dataset | str | os.PathLike

# What each job draws, and from which split; the offset keeps their random draws apart (it is part
# of every published figure, so it never changes).
HELD_OUT: dict[str, tuple[str, int]] = {
    "scan": ("test", 0),  # the auditor's small clean set
    "calibration": ("train", 1),  # STRIP's benign calibration images and overlay pool
    "evaluation": ("test", 2),  # benign and stamped test inputs that measure FRR and FAR
    "mitigation": ("train", 3),  # images that rank neurons and fit filters and pruning
}


def held_out_generator(purpose: str, seed: int) -> torch.Generator:
    """The random generator of one purpose's draws (see :data:`HELD_OUT`)."""
    if purpose not in HELD_OUT:
        raise TrojanscanError(f"unknown held-out purpose {purpose!r}; one of {', '.join(HELD_OUT)}")
    return torch.Generator().manual_seed(seed + HELD_OUT[purpose][1])


def held_out(data: Dataset, purpose: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` images (and labels) for ``purpose``, from its split."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TrojanscanError(f"need a positive number of images, got {n!r}")
    g = held_out_generator(purpose, seed)
    x, y = (data.x_train, data.y_train) if HELD_OUT[purpose][0] == "train" else (data.x_test, data.y_test)
    idx = torch.randperm(len(x), generator=g)[:n]
    if purpose == "scan":
        idx = idx.sort().values
    return x[idx], y[idx]


def clean_subset(data: Dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` test images: the auditor's small clean set."""
    if n < 1:
        raise TrojanscanError(f"--clean-samples must be >= 1, got {n}")
    return held_out(data, "scan", n, seed)


def as_dataset(data: DataLike) -> Dataset:
    """A :class:`Dataset` as it is, or the one a source name or path loads."""
    return data if isinstance(data, Dataset) else load_dataset(data)


@dataclass
class Resolved:
    """A model and data ready for a job: the module defences run (wrapped when the model expects
    normalised inputs), the user's own module, and where they came from."""

    module: nn.Module
    dataset: Dataset
    sha256: str | None
    path: Path | None
    convention: str = PLAIN_CONVENTION
    loaded: LoadedModel | None = field(default=None, repr=False)

    @property
    def inner(self) -> nn.Module:
        """The model as the user gave it (without the normalisation wrapper)."""
        return self.module.model if isinstance(self.module, NormalizedInput) else self.module

    def unwrap(self, module: nn.Module) -> nn.Module:
        """A changed copy of :attr:`module` (repaired, attacked) back in the user's convention."""
        return module.model if isinstance(module, NormalizedInput) else module

    def trigger_beside(self) -> Path | None:
        """The ground-truth trigger saved beside a model file, if there is one."""
        if self.path is not None and trigger_path_for(self.path).is_file():
            return trigger_path_for(self.path)
        return None

    def model_record(self) -> dict[str, Any]:
        """The model's part of a result file, with how far its file was checked."""
        return {"file": None if self.path is None else str(self.path), "sha256": self.sha256,
                "format": None if self.loaded is None else self.loaded.format,
                "input_convention": self.convention, **self.trust_record()}

    def trust_record(self) -> dict[str, Any]:
        """``trusted``/``checked``/``trust`` of a model file (a module in memory: the caller's own)."""
        if self.loaded is None:
            return {"trusted": True, "checked": False, "trust": "module given in Python"}
        return self.loaded.trust_record()


def load_module(model: ModelLike, input_shape: tuple[int, ...] | None, arch: str | None = None,
                trusted: bool = False) -> tuple[nn.Module, LoadedModel | None]:
    """A module as it is, or the one a model file holds (checked unless ``trusted``; see
    ``models.trust``)."""
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, arch=arch, input_shape=input_shape, trusted=trusted)
        return loaded.module, loaded
    if not isinstance(model, nn.Module):
        raise TrojanscanError(f"model must be a torch nn.Module or a model file, got {type(model).__name__}")
    return model, None


def resolve(model: ModelLike, data: DataLike, *, arch: str | None = None,
            mean: list[float] | None = None, std: list[float] | None = None,
            trusted: bool = False) -> Resolved:
    """Load the data, then the model (a file's shape comes from the data; checked unless
    ``trusted``), wrap it in its input convention, and check they fit."""
    dataset = as_dataset(data)
    module, loaded = load_module(model, dataset.input_shape, arch, trusted)
    wrapped, convention = wrap_normalization(module, mean, std, dataset.input_shape[0])
    check_model_fits(wrapped, dataset.input_shape, dataset.num_classes)
    return Resolved(wrapped, dataset, loaded.sha256 if loaded else None,
                    Path(model) if loaded else None, convention, loaded)


def known_trigger(trigger: Trigger | str | os.PathLike | None, resolved: Resolved,
                  what: str = "trigger") -> Trigger | None:
    """The trigger given, or the one saved beside the model file; checked against the data."""
    if trigger is None:
        trigger = resolved.trigger_beside()
    if trigger is None:
        return None
    trig = trigger if isinstance(trigger, Trigger) else Trigger.load(trigger)
    trig.check_compatible(resolved.dataset.input_shape, resolved.dataset.num_classes, what)
    return trig


def load_inputs(source: str | os.PathLike) -> torch.Tensor:
    """Images to check: an ``.npz`` with ``x`` (uint8 N×H×W×C, or float in [0, 1]) or a dataset's
    test split."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" in z.files:
                    x = z["x"]
                    if x.ndim == 3:
                        x = x[..., None]
                    if x.ndim != 4:
                        raise TrojanscanError(f"{path}: x must be N×H×W×C, got shape {x.shape}")
                    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
                    return t.float().div_(255) if x.dtype == np.uint8 else t.float()
        except TrojanscanError:
            raise
        except Exception as e:
            raise TrojanscanError(f"{path}: unreadable inputs ({type(e).__name__}: {e})") from None
    return load_dataset(source).x_test


def model_and_inputs(model: ModelLike, inputs: str | os.PathLike, arch: str | None = None,
                     mean: list[float] | None = None, std: list[float] | None = None,
                     trusted: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """The images to check, and the model (a file's input shape comes from them) in [0, 1] space."""
    x = load_inputs(inputs)
    module, _ = load_module(model, tuple(x.shape[1:]), arch, trusted)
    wrapped, _ = wrap_normalization(module, mean, std, int(x.shape[1]))
    return wrapped, x
