"""Training a reference net (clean or poisoned), and measuring any model's CA and ASR."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trojanscan.attacks import ATTACKS, Attack, CleanLabelData, PoisonedData, PoisoningAttack, attacks_of_kind
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.devices import place, unplace
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import sha256_file
from trojanscan.models import build_model, default_arch, save_model
from trojanscan.models.io import TORCHSCRIPT_SUFFIXES
from trojanscan.progress import ProgressCallback
from trojanscan.randomness import seed_everything
from trojanscan.report.progress import progress_bars
from trojanscan.train import TrainHistory, evaluate, train_model
from trojanscan.validation import check_model_fits
from trojanscan.workflows.inputs import DataLike, ModelLike, as_dataset, data_warnings, known_trigger, resolve
from trojanscan.workflows.records import Record, environment, internal

MODEL_SUFFIXES = (".safetensors", *TORCHSCRIPT_SUFFIXES, ".onnx")  # .onnx: for models read from ONNX


@dataclass
class TrainResult:
    """A trained model, the trigger planted in it (if any), and how it scores."""

    model: nn.Module
    trigger: Trigger | None
    clean_accuracy: float
    attack_success_rate: float | None
    history: TrainHistory
    poisoned_count: int
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    # poisoned images over the training set and, for a clean-label attack, over the target class
    poison_fractions: dict[str, float] | None = None


def poison_fractions(poisoned: PoisonedData) -> dict[str, float]:
    """The poisoned share of the training set and, for a clean-label attack, of the target class."""
    shares = {"of_training_set": len(poisoned.poisoned_indices) / len(poisoned.y)}
    if isinstance(poisoned, CleanLabelData):
        shares["of_target_class"] = poisoned.fraction_of_target_class
    return shares


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of N×C×H×W images, for the model's normalisation layer."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


def make_attack(name: str, kind: type[Attack] = PoisoningAttack, **kwargs: Any) -> Any:
    """Build a registered attack of ``kind`` by name from its keyword settings."""
    choices = attacks_of_kind(kind)
    if name not in choices:
        other = " (it is a model attack: use trojanscan attack)" if name in ATTACKS else ""
        raise TrojanscanError(f"unknown attack {name!r}{other}; choose one of {', '.join(choices)}")
    try:
        return choices[name](**kwargs)
    except TypeError as e:  # an option the attack does not have
        raise TrojanscanError(f"attack {name}: {e}") from None


def train_classifier(data: DataLike, arch: str | None = None, *, epochs: int = 5,
                     batch_size: int = 128, lr: float = 1e-3,
                     attack: PoisoningAttack | None = None, seed: int = 0,
                     progress: bool | ProgressCallback = True, device: str = "cpu") -> TrainResult:
    """Train a reference net on ``data``, poisoned by ``attack`` when one is given, on ``device``
    (the returned model is on the CPU).

    Example::

        data = load_dataset("digits")
        result = train_classifier(data, attack=BadNets(target=0, size=3), epochs=20)
        print(result.clean_accuracy, result.attack_success_rate)
    """
    data = as_dataset(data)
    seed_everything(seed)
    arch = arch or default_arch(data.input_shape, data.num_classes)
    mean, std = channel_stats(data.x_train)
    model = place(build_model(arch, data.num_classes, data.input_shape, mean, std), device)
    x, y, trigger, poisoned, fractions = data.x_train, data.y_train, None, 0, None
    if attack is not None:
        trigger = attack.make_trigger(data.input_shape)
        p = attack.poison(x, y, data.num_classes, trigger)
        x, y, poisoned, fractions = p.x, p.y, len(p.poisoned_indices), poison_fractions(p)
    start = time.perf_counter()
    with progress_bars(progress is True) as bars:
        history = train_model(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                              progress=progress if callable(progress) else bars)
    seconds = time.perf_counter() - start
    scores = evaluate(model, data.x_test, data.y_test, trigger)
    model = unplace(model)
    params = {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "attack": attack.params() if attack else None}
    return TrainResult(model, trigger, scores["clean_accuracy"], scores["attack_success_rate"],
                       history, poisoned, seconds, params, fractions)


def evaluate_model(model: nn.Module, data: DataLike,
                   trigger: Trigger | None = None) -> dict[str, Any]:
    """CA on ``data``'s test split and, with a trigger, its ASR; checks the model fits the data."""
    data = as_dataset(data)
    check_model_fits(model, data.input_shape, data.num_classes)
    if trigger is not None:
        trigger.check_compatible(data.input_shape, data.num_classes, "trigger")
    return evaluate(model, data.x_test, data.y_test, trigger)


def data_record(data: Dataset, source: Any = None) -> dict[str, Any]:
    """The data's part of a result file."""
    return {"source": None if source is None else str(source), "name": data.name, "sha256": data.sha256,
            "train": len(data.x_train), "test": len(data.x_test), "num_classes": data.num_classes,
            "input_shape": list(data.input_shape)}


def trigger_record(trigger: Trigger | None, file: Any = None) -> dict[str, Any] | None:
    """A trigger's part of a result file."""
    if trigger is None:
        return None
    return {"file": None if file is None else str(file), "target": trigger.target, "kind": trigger.kind,
            "area": trigger.area, **trigger.params}


@dataclass
class TrainRecord(Record):
    """What ``trojanscan train`` measured and wrote."""

    clean_accuracy: float
    attack_success_rate: float | None
    trigger: dict[str, Any] | None
    poisoned_count: int
    parameters: dict[str, Any]
    seed: int
    data: dict[str, Any]
    model: dict[str, Any]
    train_seconds: float
    seconds_per_epoch: list[float]
    train_loss: list[float]
    environment: dict[str, str]
    poison_fractions: dict[str, float] | None = None  # of the training set (and target class, clean-label)
    command: str = "train"


def check_model_suffix(out: str | os.PathLike) -> Path:
    """Fail before minutes of work, not after, when ``out`` is not a model format we write."""
    out = Path(out)
    if out.suffix not in MODEL_SUFFIXES:
        raise TrojanscanError(f"{out}: unknown model format; use one of {', '.join(MODEL_SUFFIXES)}")
    return out


def train_and_save(data_source: DataLike, out: str | os.PathLike, *, arch: str | None = None,
                   epochs: int = 5, attack: str | None = None,
                   attack_options: dict[str, Any] | None = None, batch_size: int = 128,
                   lr: float = 1e-3, seed: int = 0, json_path: str | os.PathLike | None = None,
                   quiet: bool = False, device: str = "cpu") -> TrainRecord:
    """Train (and poison) on a data source, save the model and its trigger beside it, and write
    the result JSON; returns the record."""
    out = check_model_suffix(out)
    data = as_dataset(data_source)
    attack_obj = make_attack(attack, seed=seed, **(attack_options or {})) if attack else None
    if not quiet:
        print(f"data {data.name}: {len(data.x_train)} train / {len(data.x_test)} test, "
              f"{data.num_classes} classes, images {data.input_shape}")
    result = train_classifier(data, arch, epochs=epochs, batch_size=batch_size, lr=lr,
                              attack=attack_obj, seed=seed, progress=not quiet, device=device)
    save_model(result.model, out, metadata={"data_sha256": data.sha256})
    trigger_file = None
    if result.trigger is not None:
        trigger_file = trigger_path_for(out)
        result.trigger.save(trigger_file)
    record = TrainRecord(
        clean_accuracy=result.clean_accuracy, attack_success_rate=result.attack_success_rate,
        trigger=trigger_record(result.trigger, trigger_file), poisoned_count=result.poisoned_count,
        poison_fractions=result.poison_fractions,
        parameters=result.params, seed=seed, data=data_record(data, data_source),
        model={"file": str(out), "sha256": sha256_file(out)}, train_seconds=result.seconds,
        seconds_per_epoch=result.history.seconds, train_loss=result.history.loss,
        environment=environment())
    if json_path is not None:
        record.write(json_path)
    return record


@dataclass
class EvaluationRecord(Record):
    """What ``trojanscan evaluate`` measured."""

    clean_accuracy: float
    attack_success_rate: float | None
    model: dict[str, Any]
    data: dict[str, Any]
    trigger: dict[str, Any] | None
    seconds: float
    environment: dict[str, str]
    warnings: list[str] = field(default_factory=list)  # signs that the data is not the model's
    trigger_found_beside_model: bool = internal(False)
    command: str = "evaluate"


def evaluate_file(model: ModelLike, data: DataLike, trigger: Trigger | str | os.PathLike | None = None,
                  *, arch: str | None = None, mean: list[float] | None = None,
                  std: list[float] | None = None, trusted: bool = False,
                  device: str = "cpu") -> EvaluationRecord:
    """CA and (with a trigger, by default the one saved beside the model) ASR of a model."""
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    beside = trigger is None and resolved.trigger_beside() is not None
    trig = known_trigger(trigger, resolved)
    start = time.perf_counter()
    scores = evaluate(resolved.module, resolved.dataset.x_test, resolved.dataset.y_test, trig)
    file = trigger if trigger is not None and not isinstance(trigger, Trigger) else resolved.trigger_beside()
    return EvaluationRecord(
        clean_accuracy=scores["clean_accuracy"], attack_success_rate=scores["attack_success_rate"],
        model=resolved.model_record(),
        data={"source": None if isinstance(data, Dataset) else str(data), "name": resolved.dataset.name,
              "sha256": resolved.dataset.sha256},
        trigger=None if trig is None else {"file": None if file is None else str(file),
                                           "target": trig.target, "kind": trig.kind},
        seconds=time.perf_counter() - start, environment=environment(),
        warnings=data_warnings(resolved, scores["clean_accuracy"]), trigger_found_beside_model=beside)
