"""Resolving what a workflow runs on: the data, the model (a file or a module) with its input
convention, and the named held-out subsets each job draws from.

A model that expects normalised inputs is declared once, with ``mean``/``std``: it is wrapped so that
every defence works on [0, 1] pictures, and a repaired copy is saved without the wrapper, so it keeps
the convention it came with.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from trojanscan.data import Dataset, load_dataset
from trojanscan.data.images import InputsLike, as_run_inputs, shape_text, to_images
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.devices import OnDevice, full_precision, place, resolve_device, resolve_precision, unplace
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import tensor_sha256
from trojanscan.models import ArchLike, LoadedModel, load_model
from trojanscan.models.modes import evaluating
from trojanscan.models.wrappers import PLAIN_CONVENTION, NormalizedInput, wrap_normalization
from trojanscan.validation import check_model_fits

ModelLike = nn.Module | LoadedModel | str | os.PathLike
# a Dataset, a source name or path, (x, y) tensors or numpy arrays, a torch Dataset, a DataLoader,
# or a (train, test) pair of the in-memory kinds: see as_dataset
DataLike = Dataset | str | os.PathLike | tuple[Any, Any] | TorchDataset | DataLoader

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
    """The :class:`Dataset` every workflow runs on, from any data-like argument.

    Args:
        data: a :class:`Dataset` (returned as it is); a source name or path (:func:`load_dataset`);
            an ``(x, y)`` pair of tensors or numpy arrays (images N×C×H×W, N×H×W×C or N×H×W,
            uint8 0–255 or float in [0, 1]; integer labels); a ``torch.utils.data.Dataset`` of
            (image, label) items; a ``DataLoader``; or a ``(train, test)`` pair of these in-memory
            kinds. One split alone serves as both the train and the test split.

    Returns:
        The dataset, float32 N×C×H×W images in [0, 1]. In memory, ``num_classes`` is the largest
        label + 1 until a workflow meets the model, whose outputs set it.

    Raises:
        TrojanscanError: one line naming what is wrong (a shape, a dtype, values outside [0, 1],
            labels that are not class indices, items that are not (image, label) pairs).

    Example::

        data = as_dataset(TensorDataset(x, y))
        data = as_dataset(((x_train, y_train), (x_test, y_test)))
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data)
    if _is_pair(data) or isinstance(data, (TorchDataset, DataLoader)):
        x, y, kind = _split(data, "data")
        x_test, y_test = x, y
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            _is_pair(s) or isinstance(s, (TorchDataset, DataLoader)) for s in data):
        x, y, kind = _split(data[0], "train split")
        x_test, y_test, _ = _split(data[1], "test split")
        if x.shape[1:] != x_test.shape[1:]:
            raise TrojanscanError(f"the train images are {shape_text(x.shape[1:])} but the test images "
                                  f"{shape_text(x_test.shape[1:])}; both splits need one image size")
    else:
        raise TrojanscanError(f"data must be a Dataset, a dataset name or path, (x, y) tensors or numpy "
                              f"arrays, a torch Dataset or a DataLoader; got {type(data).__name__}")
    same = x_test is x
    return Dataset(x, y, x_test, y_test, num_classes=max(int(y.max()), int(y_test.max())) + 1,
                   name=kind, sha256=tensor_sha256(x, y) if same else tensor_sha256(x, y, x_test, y_test),
                   classes_from_labels=True)


def _is_pair(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, np.ndarray)))


def _split(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One split's images (float32 N×C×H×W in [0, 1]) and labels (int64), and what they came as."""
    if _is_pair(data):
        x, y = data
        kind = "tensors" if isinstance(x, torch.Tensor) else "arrays"
    else:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
        x, y = _collect(loader, what)
        kind = type(data).__name__
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    images, _ = to_images(np.asarray(x), f"{what} images")
    return images, _labels(y, len(images), what), kind


def _collect(loader: DataLoader, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (images, labels) batch of a loader, concatenated."""
    xs, ys = [], []
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TrojanscanError(f"{what}: each item must be an (image, label) pair, got "
                                      f"{type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]).reshape(-1))
        if not xs:
            raise TrojanscanError(f"{what}: no (image, label) items")
        return torch.cat(xs), torch.cat(ys)
    except TrojanscanError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(f"{what}: cannot read its (image, label) items ({first}); items must be "
                              "tensors of one size (torchvision: transform=ToTensor())") from None


def _labels(y: Any, n: int, what: str) -> torch.Tensor:
    """Labels as int64 class indices, one per image."""
    try:
        t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TrojanscanError(f"{what}: labels must be integers (class indices), got "
                              f"{type(y).__name__}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TrojanscanError(f"{what}: labels have dtype {t.dtype}; they must be integers (class indices)")
    if t.dim() != 1:
        raise TrojanscanError(f"{what}: labels have shape {tuple(t.shape)}; they must be 1-D class "
                              "indices (one-hot labels: y.argmax(1))")
    if len(t) != n:
        raise TrojanscanError(f"{what}: {n} images but {len(t)} labels; they must match one to one")
    if int(t.min()) < 0:
        raise TrojanscanError(f"{what}: label {int(t.min())}; labels must be class indices 0, 1, 2, …")
    return t.long()


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
    precision: str = "float32"  # the model's arithmetic (``--precision``, resolved)

    @property
    def inner(self) -> nn.Module:
        """The model as the user gave it (without the normalisation and device wrappers)."""
        return _peel(self.module)

    def unwrap(self, module: nn.Module) -> nn.Module:
        """A changed copy of :attr:`module` (repaired, attacked) back in the user's convention, on
        the CPU."""
        return _peel(unplace(module))

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


def _peel(module: nn.Module) -> nn.Module:
    module = full_precision(module)
    module = module.model if isinstance(module, OnDevice) else module
    return module.model if isinstance(module, NormalizedInput) else module


def load_module(model: ModelLike, input_shape: tuple[int, ...] | None, arch: ArchLike | None = None,
                trusted: bool = False) -> tuple[nn.Module, LoadedModel | None]:
    """A module as it is, or the one a model file holds (checked unless ``trusted``; see
    ``models.trust``)."""
    if isinstance(model, LoadedModel):
        return model.module, model
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, arch=arch, input_shape=input_shape, trusted=trusted)
        return loaded.module, loaded
    if not isinstance(model, nn.Module):
        raise TrojanscanError(f"model must be a torch nn.Module or a model file, got {type(model).__name__}")
    return model, None


def resolve(model: ModelLike, data: DataLike, *, arch: ArchLike | None = None,
            mean: list[float] | None = None, std: list[float] | None = None,
            trusted: bool = False, device: str = "cpu", precision: str = "float32") -> Resolved:
    """Load the data, then the model (a file's shape comes from the data; checked unless
    ``trusted``), wrap it in its input convention, place it on ``device`` in ``precision`` (it takes
    and returns CPU float32 tensors: :func:`~trojanscan.devices.place`), and check they fit."""
    dataset = as_dataset(data)
    module, loaded = load_module(model, dataset.input_shape, arch, trusted)
    check_input_shape(loaded, dataset.input_shape, f"the images of {dataset.name}")
    wrapped, convention = wrap_normalization(module, mean, std, dataset.input_shape[0])
    where = resolve_device(device)  # once: a missing device warns once
    precision = resolve_precision(precision, wrapped, where)
    wrapped = place(wrapped, where, precision)
    if dataset.classes_from_labels:
        dataset = _with_model_classes(dataset, wrapped)
    check_model_fits(wrapped, dataset.input_shape, dataset.num_classes)
    return Resolved(wrapped, dataset, loaded.sha256 if loaded else None,
                    loaded.path if loaded else None, convention, loaded, precision)


def _with_model_classes(dataset: Dataset, module: nn.Module) -> Dataset:
    """Labels given in memory need not show every class: the model's outputs say how many there are."""
    try:
        with torch.no_grad(), evaluating(module):
            out = module(dataset.x_test[:2])
    except Exception:  # check_model_fits names the problem
        return dataset
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > dataset.num_classes:
        return dataclasses.replace(dataset, num_classes=int(out.shape[1]))
    return dataset


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


def load_inputs(source: InputsLike, *, key: str | None = None, layout: str | None = None,
                value_range: int | None = None) -> torch.Tensor:
    """Images to check, float32 N×C×H×W in [0, 1]: a tensor as it is, or what
    :func:`~trojanscan.data.images.read_inputs` reads from an .npz, .npy, image, image folder or
    dataset (``key``, ``layout``, ``value_range`` declare what it cannot detect)."""
    return as_run_inputs(source, key=key, layout=layout, value_range=value_range).x


def check_input_shape(loaded: LoadedModel | None, shape: tuple[int, ...], what: str) -> None:
    """Refuse images of another shape than the one a model file records, naming both."""
    expected = None if loaded is None else loaded.input_shape
    if expected is not None and tuple(expected) != tuple(shape):
        raise TrojanscanError(f"{loaded.path.name}: the model expects {shape_text(expected)} images "
                              f"(C×H×W), but {what} are {shape_text(shape)}")


def data_warnings(resolved: Resolved, clean_accuracy: float | None = None) -> list[str]:
    """Signs that the data is not what the model was made for: not the data its file records it was
    trained on, or a clean accuracy near chance (``clean_accuracy``, when measured)."""
    found = []
    data = resolved.dataset
    recorded = resolved.loaded.metadata.get("data_sha256") if resolved.loaded is not None else None
    if isinstance(recorded, str) and recorded != data.sha256:
        found.append(f"the model file records training data sha256 {recorded[:12]}…, but {data.name} is "
                     f"{data.sha256[:12]}…: another dataset, or another copy of it")
    chance = 1 / data.num_classes
    if clean_accuracy is not None and clean_accuracy < 2 * chance:
        found.append(f"clean accuracy {clean_accuracy:.1%} is near chance ({chance:.1%} for "
                     f"{data.num_classes} classes): is {data.name} the model's dataset, and are "
                     "--mean/--std right?")
    return found


def model_and_inputs(model: ModelLike, inputs: InputsLike, arch: str | None = None,
                     mean: list[float] | None = None, std: list[float] | None = None,
                     trusted: bool = False, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """The images to check, and the model (a file's input shape comes from them) in [0, 1] space on
    ``device``; images of another shape than the model's are refused naming the shape it expects."""
    found = as_run_inputs(inputs)
    x = found.x
    module, loaded = load_module(model, tuple(x.shape[1:]), arch, trusted)
    check_input_shape(loaded, tuple(x.shape[1:]), f"the inputs ({found.source})")
    wrapped, _ = wrap_normalization(module, mean, std, int(x.shape[1]))
    wrapped = place(wrapped, device)
    try:
        with torch.no_grad(), evaluating(wrapped):
            wrapped(x[:2])
    except Exception as e:  # a foreign model's own shape error, with the shape it was given
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(f"the model cannot run on the inputs' {shape_text(x.shape[1:])} images "
                              f"({found.source}): {first}") from None
    return wrapped, x
