"""Turn a scan into a fix: the input filter, neuron pruning and unlearning, measured before and after.

Each entry point takes a model, the scan that found its backdoor (``DIR`` or ``DIR/scan.json``) and
the clean data, uses the flagged labels' reversed triggers, and returns a JSON-able record: clean
accuracy (CA) and attack success rate (ASR) of the reversed trigger, and of the real one when it is
known, before and after. With the scan folder at hand the record is added to ``mitigation.json``
there and the scan's ``report.html`` gains a mitigation section.

Example::

    record = repair("model.safetensors", "scan-out", "mnist", method="unlearn", out="fixed.safetensors")
    print(record["before"], record["after"])
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trojanscan.api import _resolve, environment, model_and_inputs
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.pruning import prune
from trojanscan.defenses.scan_result import SCAN_JSON, ScanResult
from trojanscan.defenses.unlearning import unlearn
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import module_sha256, write_json
from trojanscan.metrics import attack_success_rate
from trojanscan.models import ReferenceNet, save_model
from trojanscan.models.io import TORCHSCRIPT_SUFFIXES
from trojanscan.models.wrappers import PLAIN_CONVENTION
from trojanscan.report import mitigation_section, write_scan_report
from trojanscan.train import evaluate, predict

REPAIR_METHODS = ("unlearn", "prune")
MITIGATION_JSON = "mitigation.json"


def reversed_triggers(scan: ScanResult | str | os.PathLike, labels: list[int] | None = None,
                      model_hashes: set[str] | None = None) -> tuple[ScanResult, list[Trigger]]:
    """The scan and the reversed triggers of its flagged labels (or of ``labels``); with
    ``model_hashes`` (the model's file and weight hashes) the scan must be of that model."""
    result = scan if isinstance(scan, ScanResult) else ScanResult.load(scan)
    where = "the scan" if isinstance(scan, ScanResult) else str(scan)
    if model_hashes and result.model_sha256 not in model_hashes:
        raise TrojanscanError(f"{where} was made on a different model (its sha256 differs); scan this "
                              "model first")
    if result.input_convention != PLAIN_CONVENTION:
        raise TrojanscanError(f"{where} wrapped the model with --mean/--std; repairing such a model is "
                              "not supported yet — save it with its normalisation inside and rescan")
    chosen = list(labels) if labels else list(result.flagged_labels)
    if not chosen:
        raise TrojanscanError(f"{where}: the scan flagged no label, so there is no reversed trigger to "
                              "repair against (the model looks clean); pass --label K to use label K's "
                              "trigger anyway")
    return result, [result.trigger(k) for k in chosen]


def _scores(model: nn.Module, data: Dataset, triggers: list[Trigger],
            real: Trigger | None) -> dict[str, float | None]:
    """CA on the test split, the worst reversed-trigger ASR and the real trigger's ASR."""
    base = evaluate(model, data.x_test, data.y_test, real)
    rev = max(attack_success_rate(predict(model, data.x_test, transform=t.apply), data.y_test, t.target)
              for t in triggers)
    return {"clean_accuracy": base["clean_accuracy"], "reversed_asr": rev,
            "real_asr": base["attack_success_rate"]}


def _real_trigger(trigger: Trigger | str | os.PathLike | None, path: Path | None,
                  data: Dataset) -> Trigger | None:
    if trigger is None and path is not None and trigger_path_for(path).is_file():
        trigger = trigger_path_for(path)
    if trigger is None:
        return None
    trig = trigger if isinstance(trigger, Trigger) else Trigger.load(trigger)
    trig.check_compatible(data.input_shape, data.num_classes, "real trigger")
    return trig


def _held_out(data: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of training images: ranks neurons and picks thresholds; the test split reports."""
    if n < 20:
        raise TrojanscanError(f"--samples must be at least 20 clean images, got {n}")
    g = torch.Generator().manual_seed(seed + 3)
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    return data.x_train[idx], data.y_train[idx]


def _scan_dir(scan: ScanResult | str | os.PathLike) -> Path | None:
    if isinstance(scan, ScanResult):
        return None
    p = Path(scan)
    return p.parent if p.name == SCAN_JSON else p


def _publish(record: dict[str, Any], scan: ScanResult | str | os.PathLike, result: ScanResult,
             real: Trigger | None) -> None:
    """Add the record to the scan folder's mitigation.json and redraw its report with the section."""
    folder = _scan_dir(scan)
    if folder is None:
        return
    path = folder / MITIGATION_JSON
    try:
        records = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(records, dict):
            records = {}
    except (OSError, ValueError):
        records = {}  # a damaged file only held earlier summaries; the new record replaces it
    fingerprint = result.parameters.get("fingerprint")
    records = {k: v for k, v in records.items()  # drop records of an earlier scan in this folder
               if isinstance(v, dict) and v.get("scan", {}).get("fingerprint") == fingerprint}
    records[record["method"]] = record
    write_json(path, records)
    write_scan_report(result, folder / "report.html", ground_truth=real,
                      extra_sections=[mitigation_section(records)])


def _start(model: nn.Module | str | os.PathLike, scan: ScanResult | str | os.PathLike,
           data: Dataset | str | os.PathLike, labels: list[int] | None, trigger: Any, arch: str | None):
    module, sha, dataset, path = _resolve(model, data, arch)
    # a scan of a file records the file's sha256, a scan of a module its weights' hash
    result, triggers = reversed_triggers(scan, labels, {h for h in (sha, module_sha256(module)) if h})
    for t in triggers:
        t.check_compatible(dataset.input_shape, dataset.num_classes, "reversed trigger")
    return module, sha, dataset, path, result, triggers, _real_trigger(trigger, path, dataset)


def _common(method: str, result: ScanResult, triggers: list[Trigger], sha: str | None,
            dataset: Dataset, seed: int, start: float, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "labels": [t.target for t in triggers], "parameters": parameters,
            "seed": seed, "seconds": time.perf_counter() - start, "model_sha256": sha,
            "scan": {"model_sha256": result.model_sha256, "flagged_labels": result.flagged_labels,
                     "anomaly_index": result.anomaly_index, "method": result.method,
                     "fingerprint": result.parameters.get("fingerprint")},
            "data": {"name": dataset.name, "sha256": dataset.sha256}, "environment": environment()}


def build_filter(model: nn.Module | str | os.PathLike, scan: ScanResult | str | os.PathLike,
                 data: Dataset | str | os.PathLike, *, labels: list[int] | None = None,
                 layer: str | None = None, fpr: float = 0.05, top_fraction: float = 0.01,
                 samples: int = 2000, trigger: Trigger | str | os.PathLike | None = None, seed: int = 0,
                 arch: str | None = None, out: str | os.PathLike | None = None,
                 publish: bool = True) -> tuple[InputFilter, dict[str, Any]]:
    """Fit the input filter on held-out training images; report FPR on clean test images and FNR on
    test images stamped with the reversed trigger (and the real one when known)."""
    start = time.perf_counter()
    module, sha, dataset, _, result, triggers, real = _start(model, scan, data, labels, trigger, arch)
    x_fit, _ = _held_out(dataset, samples, seed)
    filt = InputFilter(module, layer, top_fraction=top_fraction, fpr=fpr).fit(x_fit, triggers)
    targets = {t.target for t in triggers} | ({real.target} if real else set())
    others = dataset.x_test[~torch.isin(dataset.y_test, torch.tensor(sorted(targets)))]
    fnr_rev = max(float((~filt.detect(t.apply(others))).float().mean()) for t in triggers)
    fnr_real = None if real is None else float((~filt.detect(real.apply(others))).float().mean())
    summary = filt.summary()
    record = {"command": "filter", "layer": summary["layer"],
              "filter": {"target_fpr": fpr, "fpr": float(filt.detect(dataset.x_test).float().mean()),
                         "fnr_reversed": fnr_rev, "fnr_real": fnr_real, "threshold": summary["threshold"],
                         "neurons": summary["neurons"], "units": summary["units"]},
              **_common("filter", result, triggers, sha, dataset, seed, start,
                        {"fpr": fpr, "top_fraction": top_fraction, "samples": samples, "layer": layer})}
    if out is not None:
        filt.save(out)
        record["out"] = str(out)
    if publish:
        _publish(record, scan, result, real)
    return filt, record


def filter_check(model: nn.Module | str | os.PathLike, filter_path: str | os.PathLike,
                 inputs: str | os.PathLike, *, arch: str | None = None) -> dict[str, Any]:
    """Predict each input with a saved input filter in front: label, score, rejected."""
    module, x = model_and_inputs(model, inputs, arch)
    filt = InputFilter.load(filter_path, module)
    start = time.perf_counter()
    scores, labels = filt.score(x), predict(module, x)
    rejected = scores > filt.threshold_
    seconds = time.perf_counter() - start
    return {"command": "filter check", "inputs": str(inputs), "count": len(x),
            "rejected": int(rejected.sum()), "threshold": filt.threshold_, "seconds": seconds,
            "results": [{"index": i, "label": int(lab), "score": float(sc), "rejected": bool(r)}
                        for i, (lab, sc, r) in enumerate(zip(labels, scores, rejected, strict=True))]}


def repair(model: nn.Module | str | os.PathLike, scan: ScanResult | str | os.PathLike,
           data: Dataset | str | os.PathLike, *, method: str = "unlearn",
           out: str | os.PathLike | None = None, labels: list[int] | None = None,
           trigger: Trigger | str | os.PathLike | None = None, layer: str | None = None,
           samples: int = 2000, asr_threshold: float = 0.01, step: float = 0.01,
           max_fraction: float = 0.9, fraction: float = 0.1, stamp_fraction: float = 0.2,
           epochs: int = 1, lr: float = 2e-3, batch_size: int = 128, baselines: bool = False,
           seed: int = 0, arch: str | None = None, progress: bool = True,
           publish: bool = True) -> dict[str, Any]:
    """Repair ``model`` by ``method`` ("unlearn" or "prune"), save it to ``out``, return the record."""
    if method not in REPAIR_METHODS:
        raise TrojanscanError(f"unknown repair method {method!r}; choose one of {', '.join(REPAIR_METHODS)}")
    if out is not None and Path(out).suffix not in (".safetensors", *TORCHSCRIPT_SUFFIXES):
        raise TrojanscanError(f"{out}: unknown model format; use .safetensors or .pt")
    start = time.perf_counter()
    module, sha, dataset, _, result, triggers, real = _start(model, scan, data, labels, trigger, arch)
    if out is not None and Path(out).suffix == ".safetensors" and not isinstance(module, ReferenceNet):
        raise TrojanscanError(f"{out}: safetensors holds built-in architectures only; save this model "
                              "as TorchScript (.pt)")
    record: dict[str, Any] = {"command": "repair", "before": _scores(module, dataset, triggers, real)}
    if method == "prune":
        x, y = _held_out(dataset, samples, seed)
        pruned = prune(module, x, y, triggers, layer=layer, asr_threshold=asr_threshold, step=step,
                       max_fraction=max_fraction, real_trigger=real, progress=progress)
        fixed = pruned.model
        record["layer"] = pruned.layer
        record["pruning"] = {"pruned": len(pruned.pruned), "units": pruned.units,
                             "fraction": pruned.fraction, "reached": pruned.reached,
                             "asr_threshold": asr_threshold, "neurons": pruned.pruned,
                             "curve": pruned.curve}
        params = {"layer": layer, "samples": samples, "asr_threshold": asr_threshold, "step": step,
                  "max_fraction": max_fraction}
    else:
        settings = {"fraction": fraction, "stamp_fraction": stamp_fraction, "epochs": epochs, "lr": lr,
                    "batch_size": batch_size, "seed": seed}
        done = unlearn(module, dataset.x_train, dataset.y_train, triggers, progress=progress, **settings)
        fixed = done.model
        record["unlearning"] = {"images": done.images, "stamped": done.stamped,
                                "loss": done.history.loss}
        if baselines:
            record["baselines"] = {"clean-only": _scores(unlearn(
                module, dataset.x_train, dataset.y_train, [], progress=progress, **settings).model,
                dataset, triggers, real)}
            if real is not None:
                record["baselines"]["real-trigger"] = _scores(unlearn(
                    module, dataset.x_train, dataset.y_train, [real], progress=progress, **settings).model,
                    dataset, triggers, real)
        params = settings
    record["after"] = _scores(fixed, dataset, triggers, real)
    record.update(_common(method, result, triggers, sha, dataset, seed, start, params))
    if out is not None:
        save_model(fixed, out, metadata={"repaired_by": method, "repaired_from": sha,
                                         "labels": record["labels"]})
        record["out"] = str(out)
    if publish:
        _publish(record, scan, result, real)
    return record
