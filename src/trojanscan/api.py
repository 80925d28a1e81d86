"""The public Python surface: load data and models, train (optionally trojaned), evaluate."""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trojanscan.attacks import ATTACKS, PoisoningAttack
from trojanscan.data import Dataset, load_dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.defenses.neural_cleanse import NeuralCleanse
from trojanscan.defenses.repeats import RepeatedScan, combine_runs
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.strip import MIN_CALIBRATION_SAMPLES, Strip, far_frr
from trojanscan.defenses.tabor import Tabor, TaborWeights
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import sha256_file, tensor_sha256, write_json
from trojanscan.models import build_model, default_arch, load_model, save_model
from trojanscan.models.io import TORCHSCRIPT_SUFFIXES
from trojanscan.models.wrappers import wrap_normalization
from trojanscan.randomness import seed_everything
from trojanscan.report import mask_overlap, save_trigger_images, write_scan_report, write_strip_report
from trojanscan.train import TrainHistory, check_model_fits, evaluate, train_model

__all__ = ["ScanResult", "TrainResult", "channel_stats", "clean_subset", "evaluate_model",
           "load_dataset", "load_model", "make_attack", "scan", "scan_repeated", "strip_calibrate",
           "strip_check", "strip_evaluate", "strip_rates", "train_and_save", "train_classifier"]

SCAN_METHODS = {"neural-cleanse": NeuralCleanse, "tabor": Tabor}
MODEL_SUFFIXES = (".safetensors", *TORCHSCRIPT_SUFFIXES)


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


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of N×C×H×W images, for the model's normalisation layer."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


def make_attack(name: str, **kwargs: Any) -> PoisoningAttack:
    """Build an attack by name (``badnets``, ``blend``) from its keyword settings."""
    if name not in ATTACKS:
        raise TrojanscanError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](**kwargs)


def train_classifier(data: Dataset, arch: str | None = None, *, epochs: int = 5,
                     batch_size: int = 128, lr: float = 1e-3,
                     attack: PoisoningAttack | None = None, seed: int = 0,
                     progress: bool = True) -> TrainResult:
    """Train a reference net on ``data``, poisoned by ``attack`` when one is given.

    Example::

        data = load_dataset("digits")
        result = train_classifier(data, attack=BadNets(target=0, size=3), epochs=20)
        print(result.clean_accuracy, result.attack_success_rate)
    """
    seed_everything(seed)
    arch = arch or default_arch(data.input_shape, data.num_classes)
    mean, std = channel_stats(data.x_train)
    model = build_model(arch, data.num_classes, data.input_shape, mean, std)
    x, y, trigger, poisoned = data.x_train, data.y_train, None, 0
    if attack is not None:
        trigger = attack.make_trigger(data.input_shape)
        p = attack.poison(x, y, data.num_classes, trigger)
        x, y, poisoned = p.x, p.y, len(p.poisoned_indices)
    start = time.perf_counter()
    history = train_model(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress)
    seconds = time.perf_counter() - start
    scores = evaluate(model, data.x_test, data.y_test, trigger)
    params = {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "attack": attack.params() if attack else None}
    return TrainResult(model, trigger, scores["clean_accuracy"], scores["attack_success_rate"],
                       history, poisoned, seconds, params)


def evaluate_model(model: nn.Module, data: Dataset,
                   trigger: Trigger | None = None) -> dict[str, float | None]:
    """CA on ``data``'s test split and, with a trigger, its ASR; checks the model fits the data."""
    check_model_fits(model, data.input_shape, data.num_classes)
    if trigger is not None:
        trigger.check_compatible(data.input_shape, data.num_classes, "trigger")
    return evaluate(model, data.x_test, data.y_test, trigger)


def environment() -> dict[str, str]:
    """Versions and threads, recorded in every result file."""
    from trojanscan import __version__

    return {"trojanscan": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads())}


def train_and_save(data_source: str, out: str | os.PathLike, *, arch: str | None = None,
                   epochs: int = 5, attack: str | None = None,
                   attack_options: dict[str, Any] | None = None, batch_size: int = 128,
                   lr: float = 1e-3, seed: int = 0, json_path: str | os.PathLike | None = None,
                   quiet: bool = False) -> dict[str, Any]:
    """Train (and poison) on a data source, save the model and its trigger beside it, and write
    the result JSON; returns the result record."""
    out = Path(out)
    attack_options = attack_options or {}
    if out.suffix not in MODEL_SUFFIXES:  # fail before minutes of training, not after
        raise TrojanscanError(f"{out}: unknown model format; use one of {', '.join(MODEL_SUFFIXES)}")
    data = load_dataset(data_source)
    attack_obj = make_attack(attack, seed=seed, **attack_options) if attack else None
    if not quiet:
        print(f"data {data.name}: {len(data.x_train)} train / {len(data.x_test)} test, "
              f"{data.num_classes} classes, images {data.input_shape}")
    result = train_classifier(data, arch, epochs=epochs, batch_size=batch_size, lr=lr,
                              attack=attack_obj, seed=seed, progress=not quiet)
    save_model(result.model, out, metadata={"data_sha256": data.sha256})
    trigger_file = None
    if result.trigger is not None:
        trigger_file = trigger_path_for(out)
        result.trigger.save(trigger_file)
    record = {
        "command": "train",
        "clean_accuracy": result.clean_accuracy,
        "attack_success_rate": result.attack_success_rate,
        "trigger": None if result.trigger is None else {
            "file": str(trigger_file), "target": result.trigger.target,
            "kind": result.trigger.kind, "area": result.trigger.area, **result.trigger.params},
        "poisoned_count": result.poisoned_count,
        "parameters": result.params,
        "seed": seed,
        "data": {"source": str(data_source), "name": data.name, "sha256": data.sha256,
                 "train": len(data.x_train), "test": len(data.x_test),
                 "num_classes": data.num_classes, "input_shape": list(data.input_shape)},
        "model": {"file": str(out), "sha256": sha256_file(out)},
        "train_seconds": result.seconds,
        "seconds_per_epoch": result.history.seconds,
        "train_loss": result.history.loss,
        "environment": environment(),
    }
    if json_path is not None:
        write_json(json_path, record)
    return record


def clean_subset(data: Dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` test images: the auditor's small clean set."""
    if n < 1:
        raise TrojanscanError(f"--clean-samples must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_test), generator=g)[:n].sort().values
    return data.x_test[idx], data.y_test[idx]


def _ground_truth_record(result: ScanResult, truth: Trigger) -> dict[str, Any]:
    record: dict[str, Any] = {"target": truth.target, "kind": truth.kind, "area": truth.area,
                              "target_flagged": truth.target in result.flagged_labels}
    scanned = {r.label for r in result.labels}
    if truth.target in scanned:
        r = result.label(truth.target)
        record.update({"reversed_l1": r.l1_norm, "target_anomaly_index": r.anomaly_index,
                       "overlap": mask_overlap(r.mask, truth.mask)})
    return record


def scan(model: nn.Module | str | os.PathLike, data: Dataset | str | os.PathLike, *,
         method: str = "neural-cleanse", schedule: str = "default", steps: int | None = None,
         labels: list[int] | None = None, chunk: int = 10, clean_samples: int = 1000,
         threshold: float = 2.0, seed: int = 0, mean: list[float] | None = None,
         std: list[float] | None = None, arch: str | None = None,
         ground_truth: Trigger | str | os.PathLike | None = None,
         out_dir: str | os.PathLike | None = None, progress: bool = True,
         tabor_weights: TaborWeights | None = None) -> ScanResult:
    """Scan a model for backdoors with clean data, by ``method`` "neural-cleanse" or "tabor"; with
    ``out_dir`` write scan.json, the trigger images and ``report.html`` (resumable: rerun with the
    same folder to continue).

    Example::

        result = scan("model.safetensors", "mnist", out_dir="scan-out")
        print(result.infected, result.flagged_labels, result.anomaly_index)
    """
    if method not in SCAN_METHODS:
        raise TrojanscanError(f"unknown scan method {method!r}; choose one of {', '.join(SCAN_METHODS)}")
    module, model_sha, dataset, model_path = _resolve(model, data, arch)
    if ground_truth is None and model_path is not None and trigger_path_for(model_path).is_file():
        ground_truth = trigger_path_for(model_path)
    if isinstance(ground_truth, (str, os.PathLike)):
        ground_truth = Trigger.load(ground_truth)
    if ground_truth is not None:
        ground_truth.check_compatible(dataset.input_shape, dataset.num_classes, "ground-truth trigger")
    module, convention = wrap_normalization(module, mean, std, dataset.input_shape[0])
    x, y = clean_subset(dataset, clean_samples, seed)
    notes = []
    if clean_samples > len(dataset.x_test):
        notes.append(f"asked for {clean_samples} clean samples but the test split has only "
                     f"{len(dataset.x_test)}: all of them were used")
    if tabor_weights is not None and method != "tabor":
        raise TrojanscanError("TABOR weights (--tabor-weights) need --method tabor")
    options = {"weights": tabor_weights} if method == "tabor" else {}
    detector = SCAN_METHODS[method](schedule, steps=steps, chunk=chunk, threshold=threshold, seed=seed,
                                    progress=progress, **options)
    result = detector.scan(module, x, y, num_classes=dataset.num_classes, labels=labels,
                           out_dir=out_dir, model_sha256=model_sha,
                           data_sha256=tensor_sha256(x, y), input_convention=convention)
    result.warnings.extend(notes)
    result.extra["data"] = {"name": dataset.name, "sha256": dataset.sha256}
    if ground_truth is not None:
        result.extra["ground_truth"] = _ground_truth_record(result, ground_truth)
    if out_dir is not None:
        out = Path(out_dir)
        result.save(out, write_labels=False)  # the labels were written as they finished
        save_trigger_images(result, out)
        write_scan_report(result, out / "report.html", ground_truth=ground_truth)
    return result


def scan_repeated(model: nn.Module | str | os.PathLike, data: Dataset | str | os.PathLike, *,
                  repeats: int = 3, seed: int = 0, threshold: float = 2.0,
                  out_dir: str | os.PathLike | None = None, **options: Any) -> RepeatedScan:
    """Scan ``repeats`` times with seeds ``seed, seed+1, …`` (each its own clean subset and start)
    and flag outliers of the averaged trigger norms; with ``out_dir``, each run goes in
    ``seed-N/`` and the combined verdict in ``repeats.json``. Other options are :func:`scan`'s."""
    if repeats < 1:
        raise TrojanscanError(f"--repeats must be >= 1, got {repeats}")
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    runs = [scan(model, dataset, seed=s, threshold=threshold,
                 out_dir=None if out_dir is None else Path(out_dir) / f"seed-{s}", **options)
            for s in range(seed, seed + repeats)]
    combined = combine_runs(runs, threshold)
    if out_dir is not None:
        write_json(Path(out_dir) / "repeats.json", {**combined.to_dict(),
                                                    "runs": [f"seed-{r.seed}" for r in runs],
                                                    "environment": environment()})
    return combined


def _resolve(model: nn.Module | str | os.PathLike, data: Dataset | str | os.PathLike,
             arch: str | None) -> tuple[nn.Module, str | None, Dataset, Path | None]:
    """Load the data, then the model (a file's shape comes from the data); check they fit."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, arch=arch, input_shape=dataset.input_shape)
        module, sha, path = loaded.module, loaded.sha256, Path(model)
    else:
        module, sha, path = model, None, None
    check_model_fits(module, dataset.input_shape, dataset.num_classes)
    return module, sha, dataset, path


def _train_subset(data: Dataset, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return data.x_train[torch.randperm(len(data.x_train), generator=g)[:n]]


def strip_calibrate(model: nn.Module | str | os.PathLike, data: Dataset | str | os.PathLike, *,
                    n: int = 100, frr: float = 0.01, samples: int = 2000, blend: str = "add",
                    boundary: str = "normal", seed: int = 0, arch: str | None = None,
                    temperature: float | str = 1.0, out: str | os.PathLike | None = None,
                    accelerate: bool = True) -> Strip:
    """Fit STRIP's boundary on ``samples`` benign training images (also the overlay pool)."""
    module, _, dataset, _ = _resolve(model, data, arch)
    strip = Strip(module, n=n, frr=frr, blend=blend, boundary=boundary, seed=seed,
                  temperature=temperature, accelerate=accelerate)
    strip.calibrate(_train_subset(dataset, samples, seed))
    if out is not None:
        strip.save(out)
    return strip


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


def model_and_inputs(model: nn.Module | str | os.PathLike, inputs: str | os.PathLike,
                     arch: str | None = None) -> tuple[nn.Module, torch.Tensor]:
    """The images to check, and the model (a file's input shape comes from them)."""
    x = load_inputs(inputs)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, arch=arch, input_shape=tuple(x.shape[1:])).module, x
    return model, x


def strip_check(model: nn.Module | str | os.PathLike, calibration: str | os.PathLike,
                inputs: str | os.PathLike, *, arch: str | None = None,
                full_entropy: bool = False, accelerate: bool = True) -> dict[str, Any]:
    """Predict and flag each input with a saved calibration.

    By default each input is copied only until its verdict is certain (:meth:`Strip.screen`), so
    an input decided early gets ``entropy_at_least`` (benign) or ``entropy_below`` (trojaned) instead
    of ``entropy``; ``full_entropy`` runs all N copies for every input.
    """
    module, x = model_and_inputs(model, inputs, arch)
    strip = Strip.load(calibration, module, accelerate=accelerate)
    start = time.perf_counter()
    if full_entropy:
        entropy = strip.entropy(x)
        flags, total, used = entropy < strip.boundary_, entropy * strip.n, torch.full((len(x),), strip.n)
    else:
        flags, total, used = strip.screen(x)
    labels = strip.labels(x)
    seconds = time.perf_counter() - start
    results = []
    for i, (lab, f, h_sum, k) in enumerate(zip(labels, flags, total, used, strict=True)):
        row: dict[str, Any] = {"index": i, "label": int(lab), "trojaned": bool(f), "copies": int(k)}
        if k == strip.n:
            row["entropy"] = float(h_sum) / strip.n
        elif f:  # stopped early: too low to reach the boundary even with maximal remaining copies
            row["entropy_below"] = strip.boundary_
        else:  # stopped early: the copies so far already pass the boundary
            row["entropy_at_least"] = float(h_sum) / strip.n
        results.append(row)
    return {"command": "strip check", "inputs": str(inputs), "count": len(x),
            "trojaned": int(flags.sum()), "boundary": strip.boundary_, "n": strip.n,
            "temperature": strip.temperature_, "accelerated": strip.accelerated,
            "mean_copies": float(used.double().mean()) if len(x) else 0.0,
            "seconds": seconds, "inputs_per_second": len(x) / seconds if seconds else None,
            "results": results}


def _per_second(work: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    work()
    return count / max(time.perf_counter() - start, 1e-9)


def _throughput(strip: Strip, x: torch.Tensor,
                stamped: torch.Tensor | None = None) -> dict[str, float]:
    """Inputs per second: plain inference (by the module STRIP classifies with), all N copies
    (``entropy``), and guarded prediction (labels + early-exit flags, :meth:`Strip.predict`) on
    benign and, if given, stamped inputs."""
    plain = _per_second(lambda: strip.labels(x), len(x))
    full = _per_second(lambda: strip.entropy(x), len(x))
    record = {"inputs_per_second": full, "plain_inputs_per_second": plain, "slowdown": plain / full,
              "guarded_benign_inputs_per_second": _per_second(lambda: strip.predict(x), len(x))}
    if stamped is not None:
        record["guarded_trojaned_inputs_per_second"] = _per_second(lambda: strip.predict(stamped),
                                                                  len(stamped))
    return record


@dataclass
class StripRun:
    """What :func:`strip_rates` measured: the inputs, their entropies and the error rates."""

    benign: torch.Tensor
    h_benign: torch.Tensor
    stamped: torch.Tensor | None
    h_trojan: torch.Tensor | None
    rates: dict[str, Any]


def strip_rates(strip: Strip, dataset: Dataset, trigger: Trigger | None, *, samples: int = 2000,
                calibration_samples: int = 2000, seed: int = 0) -> StripRun:
    """Calibrate ``strip`` on training images, then measure FRR on ``samples`` clean test images
    and (with a trigger) FAR on as many stamped ones of other labels."""
    strip.calibrate(_train_subset(dataset, calibration_samples, seed))
    g = torch.Generator().manual_seed(seed + 2)
    benign = dataset.x_test[torch.randperm(len(dataset.x_test), generator=g)[:samples]]
    h_benign = strip.entropy(benign)
    if trigger is None:  # a clean model: only the false rejections can be measured
        return StripRun(benign, h_benign, None, None,
                        far_frr(h_benign < strip.boundary_, torch.zeros(0)))
    others = dataset.x_test[dataset.y_test != trigger.target]
    stamped = trigger.apply(others[torch.randperm(len(others), generator=g)[:samples]])
    h_trojan = strip.entropy(stamped)
    return StripRun(benign, h_benign, stamped, h_trojan,
                    far_frr(h_benign < strip.boundary_, h_trojan < strip.boundary_))


def strip_evaluate(model: nn.Module | str | os.PathLike, data: Dataset | str | os.PathLike,
                   trigger: Trigger | str | os.PathLike | None = None, *, n: int = 100,
                   frr: float = 0.01, samples: int = 2000, calibration_samples: int = 2000,
                   blend: str = "add", boundary: str = "normal", seed: int = 0,
                   arch: str | None = None, throughput_inputs: int = 500,
                   temperature: float | str = 1.0, out_dir: str | os.PathLike | None = None,
                   accelerate: bool = True) -> dict[str, Any]:
    """FRR on clean test images and FAR on trigger-stamped ones, with throughput for N=10, 20, 100."""
    module, model_sha, dataset, path = _resolve(model, data, arch)
    if trigger is None and path is not None and trigger_path_for(path).is_file():
        trigger = trigger_path_for(path)
    if trigger is None:
        raise TrojanscanError("strip evaluate needs the trigger (--trigger FILE) to stamp inputs")
    trig = trigger if isinstance(trigger, Trigger) else Trigger.load(trigger)
    trig.check_compatible(dataset.input_shape, dataset.num_classes, "trigger")
    if throughput_inputs < MIN_CALIBRATION_SAMPLES:
        raise TrojanscanError(f"throughput_inputs must be at least {MIN_CALIBRATION_SAMPLES} (each N is "
                              f"calibrated on that many images), got {throughput_inputs}")
    strip = Strip(module, n=n, frr=frr, blend=blend, boundary=boundary, seed=seed,
                  temperature=temperature, accelerate=accelerate)
    run = strip_rates(strip, dataset, trig, samples=samples, calibration_samples=calibration_samples,
                      seed=seed)
    benign, h_benign, h_trojan, rates = run.benign, run.h_benign, run.h_trojan, run.rates
    speed = {}
    calibration = strip.overlays_  # strip_rates calibrated on these images, also the overlay pool
    for copies in (10, 20, 100):  # each N gets its own boundary, which sets where screening stops
        probe = Strip(module, n=copies, frr=frr, blend=blend, boundary=boundary, seed=seed,
                      temperature=strip.temperature_, accelerate=accelerate)
        with warnings.catch_warnings():  # recorded below instead
            warnings.simplefilter("ignore", UserWarning)
            probe.calibrate(calibration[:throughput_inputs], overlay_pool=strip.overlays_)
        speed[f"n{copies}"] = _throughput(probe, benign[:throughput_inputs],
                                          run.stamped[:throughput_inputs])
        speed[f"n{copies}"]["boundary"] = probe.boundary_  # at or below 0 nothing can be flagged
    record = {
        "command": "strip evaluate", "frr": rates["frr"], "far": rates["far"], "target_frr": frr,
        "n": n, "blend": blend, "boundary_method": boundary, "boundary": strip.boundary_,
        "temperature": strip.temperature, "temperature_used": strip.temperature_,
        "accelerated": strip.accelerated,
        "benign_entropy": {"mean": float(h_benign.mean()), "std": float(h_benign.std())},
        "trojaned_entropy": {"mean": float(h_trojan.mean()), "std": float(h_trojan.std())},
        "calibration": {"samples": strip.n_calibration_, "mean": strip.entropy_mean_,
                        "std": strip.entropy_std_, "sha256": strip.calibration_sha256_},
        "benign_inputs": len(benign), "trojaned_inputs": len(h_trojan), "throughput": speed,
        "trigger": {"target": trig.target, "kind": trig.kind}, "seed": seed,
        "model_sha256": model_sha, "data": {"name": dataset.name, "sha256": dataset.sha256},
        "environment": environment(),
    }
    record["summary"] = {
        "FRR (benign flagged)": f"{100 * rates['frr']:.2f}%",
        "FAR (trojaned accepted)": f"{100 * rates['far']:.2f}%",
        "boundary (bits)": f"{strip.boundary_:.4f}",
        "inputs/s, N=10": f"{speed['n10']['inputs_per_second']:.0f}",
        "inputs/s, N=100": f"{speed['n100']['inputs_per_second']:.0f}",
        "guarded benign inputs/s, N=20 (early exit)":
            f"{speed['n20']['guarded_benign_inputs_per_second']:.0f}",
        "softmax temperature": f"{strip.temperature_:g}",
        "plain inference inputs/s": f"{speed['n10']['plain_inputs_per_second']:.0f}",
    }
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "strip.json", record)
        write_strip_report(record, h_benign, h_trojan, out / "report.html")
    return record
