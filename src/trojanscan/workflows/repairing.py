"""Turn a scan into a fix: the input filter, neuron pruning and unlearning, measured before and after;
and Fine-Pruning, which needs no scan.

Each entry point takes a model, the scan that found its backdoor (``DIR`` or ``DIR/scan.json``) and
the clean data, uses the flagged labels' reversed triggers, and returns a JSON-able record: clean
accuracy (CA) and attack success rate (ASR) of the reversed trigger, and of the real one when it is
known, before and after. With the scan folder at hand the record is added to ``mitigation.json``
there and the scan's ``report.html`` gains a mitigation section. Fine-Pruning (``method="fine-prune"``)
uses only clean data, so its scan is optional: without one it reports the real trigger's ASR (when
known) and publishes nowhere; with one it also measures the reversed trigger and publishes as the
others do.

Example::

    record = repair("model.safetensors", "scan-out", "mnist", method="unlearn", out="fixed.safetensors")
    print(record.before, record.after)
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.fine_pruning import fine_prune
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.pruning import prune
from trojanscan.defenses.scan_result import SCAN_JSON, ScanResult
from trojanscan.defenses.unlearning import unlearn
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import folder_lock, module_sha256, write_json
from trojanscan.metrics import attack_success_rate
from trojanscan.models import check_save_target, save_model
from trojanscan.models.wrappers import PLAIN_CONVENTION
from trojanscan.report import mitigation_section, write_scan_report
from trojanscan.report.progress import progress_bars
from trojanscan.train import evaluate, predict
from trojanscan.validation import check_choice
from trojanscan.workflows.inputs import DataLike, ModelLike, Resolved, held_out, known_trigger, resolve
from trojanscan.workflows.records import MITIGATION_JSON, Record, environment, internal, mitigation_records
from trojanscan.workflows.training import check_model_suffix

REPAIR_METHODS = ("unlearn", "prune", "fine-prune")
SCAN_FREE_METHODS = ("fine-prune",)  # repairs that use clean data only, so a scan is optional
DEFAULT_LR = {"unlearn": 2e-3, "fine-prune": 2e-4}  # fine-pruning's constant rate; unlearning's one-cycle


def reversed_triggers(scan: ScanResult | str | os.PathLike, labels: list[int] | None = None,
                      model_hashes: set[str] | None = None,
                      convention: str = PLAIN_CONVENTION) -> tuple[ScanResult, list[Trigger]]:
    """The scan and the reversed triggers of its flagged labels (or of ``labels``); with
    ``model_hashes`` (the model's file and weight hashes) the scan must be of that model, and it must
    have seen the model in the same input ``convention`` (the same --mean/--std)."""
    result = scan if isinstance(scan, ScanResult) else ScanResult.load(scan)
    where = "the scan" if isinstance(scan, ScanResult) else str(scan)
    if model_hashes and result.model_sha256 not in model_hashes:
        raise TrojanscanError(f"{where} was made on a different model (its sha256 differs); scan this "
                              "model first")
    if result.input_convention != convention:
        raise TrojanscanError(f"{where} saw the model as {result.input_convention!r} but this run as "
                              f"{convention!r}; pass the same --mean/--std as the scan")
    chosen = list(labels) if labels else list(result.flagged_labels)
    if not chosen:
        raise TrojanscanError(f"{where}: the scan flagged no label, so there is no reversed trigger to "
                              "repair against (the model looks clean); pass --label K to use label K's "
                              "trigger anyway")
    return result, [result.trigger(k) for k in chosen]


def _scores(model: nn.Module, data: Dataset, triggers: list[Trigger],
            real: Trigger | None) -> dict[str, float | None]:
    """CA on the test split, the worst reversed-trigger ASR (None without one) and the real trigger's ASR."""
    base = evaluate(model, data.x_test, data.y_test, real)
    rev = max((attack_success_rate(predict(model, data.x_test, transform=t.apply), data.y_test, t.target)
               for t in triggers), default=None)
    return {"clean_accuracy": base["clean_accuracy"], "reversed_asr": rev,
            "real_asr": base["attack_success_rate"]}


def _mitigation_images(data: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out training images that rank neurons and pick thresholds; the test split reports."""
    if n < 20:
        raise TrojanscanError(f"--samples must be at least 20 clean images, got {n}")
    return held_out(data, "mitigation", n, seed)


def _scan_dir(scan: ScanResult | str | os.PathLike | None) -> Path | None:
    if scan is None or isinstance(scan, ScanResult):
        return None
    p = Path(scan)
    return p.parent if p.name == SCAN_JSON else p


def _publish(record: MitigationRecord, scan: ScanResult | str | os.PathLike | None, result: ScanResult | None,
             real: Trigger | None) -> None:
    """Add the record to the scan folder's mitigation.json and redraw its report with the section."""
    folder = _scan_dir(scan)
    if folder is None or result is None:
        return
    path = folder / MITIGATION_JSON
    # a damaged file only held earlier summaries; records of an earlier scan in the folder are dropped
    records = mitigation_records(folder, result.parameters.get("fingerprint"))
    records[record.method] = record.to_dict()
    write_json(path, records)
    write_scan_report(result, folder / "report.html", ground_truth=real,
                      extra_sections=[mitigation_section(records)])


def _locks_scan_folder(func: Any) -> Any:
    """Hold the scan folder a mitigation publishes into (see :func:`_publish`) while it runs, so
    that no scan rewrites it and no other mitigation's record is lost."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        folder = _scan_dir(bound.arguments["scan"]) if bound.arguments["publish"] else None
        with folder_lock(folder, "scan folder", create=False):
            return func(*args, **kwargs)
    return wrapper


@dataclass
class _Setup:
    """What every mitigation starts from: the model and data, the scan, its triggers, the real one."""

    resolved: Resolved
    result: ScanResult | None  # None: a repair that needs no scan was run without one
    triggers: list[Trigger]
    real: Trigger | None


def _start(model: ModelLike, scan: ScanResult | str | os.PathLike | None, data: DataLike,
           labels: list[int] | None, trigger: Any, arch: str | None, mean: list[float] | None,
           std: list[float] | None, trusted: bool = False, device: str = "cpu") -> _Setup:
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    if scan is None:
        return _Setup(resolved, None, [], known_trigger(trigger, resolved, "real trigger"))
    # a scan of a file records the file's sha256, a scan of a module its weights' hash
    hashes = {h for h in (resolved.sha256, module_sha256(resolved.module)) if h}
    result, triggers = reversed_triggers(scan, labels, hashes, resolved.convention)
    for t in triggers:
        t.check_compatible(resolved.dataset.input_shape, resolved.dataset.num_classes, "reversed trigger")
    return _Setup(resolved, result, triggers, known_trigger(trigger, resolved, "real trigger"))


@dataclass
class MitigationRecord(Record):
    """What a mitigation measured: CA and ASR before and after (or the filter's rates)."""

    command: str
    method: str
    labels: list[int]
    parameters: dict[str, Any]
    seed: int
    seconds: float
    model_sha256: str | None
    scan: dict[str, Any] | None  # None: fine-pruning without a scan
    data: dict[str, Any]
    environment: dict[str, str]
    before: dict[str, float | None] | None = None
    after: dict[str, float | None] | None = None
    layer: str | None = None
    filter: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    unlearning: dict[str, Any] | None = None
    fine_pruning: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None
    input_convention: str = PLAIN_CONVENTION
    model_trust: dict[str, Any] | None = None
    out: str | None = None
    model: nn.Module | None = internal()  # the repaired network (repair)
    guard: InputFilter | None = internal()  # the fitted input filter (build_filter)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


def _record(command: str, method: str, setup: _Setup, seed: int, start: float,
            parameters: dict[str, Any], **parts: Any) -> MitigationRecord:
    result, dataset = setup.result, setup.resolved.dataset
    return MitigationRecord(
        command=command, method=method, labels=[t.target for t in setup.triggers], parameters=parameters,
        seed=seed, seconds=time.perf_counter() - start, model_sha256=setup.resolved.sha256,
        scan=None if result is None else {
            "model_sha256": result.model_sha256, "flagged_labels": result.flagged_labels,
            "anomaly_index": result.anomaly_index, "method": result.method,
            "fingerprint": result.parameters.get("fingerprint")},
        data={"name": dataset.name, "sha256": dataset.sha256}, environment=environment(),
        input_convention=setup.resolved.convention, model_trust=setup.resolved.trust_record(), **parts)


@_locks_scan_folder
def build_filter(model: ModelLike, scan: ScanResult | str | os.PathLike, data: DataLike, *,
                 labels: list[int] | None = None, layer: str | None = None, fpr: float = 0.05,
                 top_fraction: float = 0.01, samples: int = 2000,
                 trigger: Trigger | str | os.PathLike | None = None, seed: int = 0,
                 arch: str | None = None, out: str | os.PathLike | None = None, publish: bool = True,
                 mean: list[float] | None = None, std: list[float] | None = None, trusted: bool = False,
                 device: str = "cpu") -> tuple[InputFilter, MitigationRecord]:
    """Fit the input filter on held-out training images; report FPR on clean test images and FNR on
    test images stamped with the reversed trigger (and the real one when known).

    Returns:
        The fitted :class:`InputFilter` and the :class:`MitigationRecord` (which carries it too,
        as ``record.guard``). ``model`` and ``data`` are taken as by :func:`repair`.
    """
    start = time.perf_counter()
    setup = _start(model, scan, data, labels, trigger, arch, mean, std, trusted, device)
    module, dataset = setup.resolved.module, setup.resolved.dataset
    triggers, real = setup.triggers, setup.real
    x_fit, _ = _mitigation_images(dataset, samples, seed)
    filt = InputFilter(module, layer, top_fraction=top_fraction, fpr=fpr).fit(x_fit, triggers)
    targets = {t.target for t in triggers} | ({real.target} if real else set())
    others = dataset.x_test[~torch.isin(dataset.y_test, torch.tensor(sorted(targets)))]
    fnr_rev = max(float((~filt.detect(t.apply(others))).float().mean()) for t in triggers)
    fnr_real = None if real is None else float((~filt.detect(real.apply(others))).float().mean())
    summary = filt.summary()
    record = _record("filter", "filter", setup, seed, start,
                     {"fpr": fpr, "top_fraction": top_fraction, "samples": samples, "layer": layer},
                     layer=summary["layer"], guard=filt,
                     filter={"target_fpr": fpr, "fpr": float(filt.detect(dataset.x_test).float().mean()),
                             "fnr_reversed": fnr_rev, "fnr_real": fnr_real,
                             "threshold": summary["threshold"], "neurons": summary["neurons"],
                             "units": summary["units"]})
    if out is not None:
        filt.save(out)
        record.out = str(out)
    if publish:
        _publish(record, scan, setup.result, real)
    return filt, record


@_locks_scan_folder
def repair(model: ModelLike, scan: ScanResult | str | os.PathLike | None, data: DataLike, *,
           method: str = "unlearn", out: str | os.PathLike | None = None, labels: list[int] | None = None,
           trigger: Trigger | str | os.PathLike | None = None, layer: str | None = None,
           samples: int = 2000, asr_threshold: float = 0.01, step: float = 0.01,
           max_fraction: float = 0.9, max_accuracy_drop: float | None = 0.02,
           fraction: float = 0.1, stamp_fraction: float = 0.2,
           epochs: int = 1, lr: float | None = None, batch_size: int = 128, baselines: bool = False,
           seed: int = 0, arch: str | None = None, progress: bool = True, publish: bool = True,
           mean: list[float] | None = None, std: list[float] | None = None,
           trusted: bool = False, device: str = "cpu") -> MitigationRecord:
    """Repair ``model`` by ``method`` ("unlearn", "prune" or "fine-prune"), save it to ``out`` in the
    model's own input convention, and return the record (the repaired module is ``record.model``).
    Pruning and fine-pruning stop before a step that costs more than ``max_accuracy_drop`` of clean
    accuracy (0.02 = 2 points; None: no budget; the Fine-Pruning paper allows 0.04). Fine-pruning
    silences the last convolution's (or ``layer``'s) dormant channels, ``step`` at a time up to
    ``max_fraction``, then fine-tunes on ``fraction`` of the clean training split for ``epochs``.
    ``lr`` defaults by method: 2e-3 for unlearning (one-cycle), 2e-4 for fine-pruning (constant).

    Args:
        model: an ``nn.Module``, a :class:`~trojanscan.models.LoadedModel` or a model file.
        scan: the scan that flagged the backdoor: a :class:`ScanResult` or its folder; optional (None)
            for fine-pruning, which uses clean data only.
        data: clean data, anything :func:`~trojanscan.workflows.inputs.as_dataset` takes (a name or
            path, a Dataset, (x, y) tensors or arrays, a torch Dataset or a DataLoader); unlearning
            fine-tunes on its train split, CA and ASR are measured on its test split.

    Returns:
        A :class:`MitigationRecord`: ``before``/``after`` CA and ASR, ``model`` the repaired
        ``nn.Module``, ``to_dict()`` its JSON.

    Example::

        record = repair(model, scan(model, loader), loader, method="unlearn")
        fixed = record.model
    """
    check_choice("repair method", method, REPAIR_METHODS)
    if scan is None and method not in SCAN_FREE_METHODS:
        raise TrojanscanError(f"repair by {method} needs the scan that found the backdoor (--scan DIR); "
                              f"only {', '.join(SCAN_FREE_METHODS)} works without one")
    lr = DEFAULT_LR.get(method, DEFAULT_LR["unlearn"]) if lr is None else lr
    if out is not None:
        check_model_suffix(out)
    start = time.perf_counter()
    setup = _start(model, scan, data, labels, trigger, arch, mean, std, trusted, device)
    resolved, triggers, real = setup.resolved, setup.triggers, setup.real
    module, dataset = resolved.module, resolved.dataset
    if out is not None:
        check_save_target(resolved.inner, out)
    before = _scores(module, dataset, triggers, real)
    parts: dict[str, Any] = {}
    with progress_bars(progress is True) as bars:
        progress = progress if callable(progress) else bars
        if method == "prune":
            x, y = _mitigation_images(dataset, samples, seed)
            pruned = prune(module, x, y, triggers, layer=layer, asr_threshold=asr_threshold, step=step,
                           max_fraction=max_fraction, real_trigger=real,
                           max_accuracy_drop=max_accuracy_drop, progress=progress)
            fixed = pruned.model
            parts["layer"] = pruned.layer
            parts["pruning"] = {"pruned": len(pruned.pruned), "units": pruned.units,
                                "fraction": pruned.fraction, "reached": pruned.reached,
                                "asr_threshold": asr_threshold, "neurons": pruned.pruned,
                                "curve": pruned.curve, "max_accuracy_drop": max_accuracy_drop,
                                "over_budget": pruned.over_budget}
            params = {"layer": layer, "samples": samples, "asr_threshold": asr_threshold, "step": step,
                      "max_fraction": max_fraction, "max_accuracy_drop": max_accuracy_drop}
        elif method == "fine-prune":
            x, y = _mitigation_images(dataset, samples, seed)
            params = {"layer": layer, "samples": samples, "step": step, "max_fraction": max_fraction,
                      "max_accuracy_drop": max_accuracy_drop, "fraction": fraction, "epochs": epochs,
                      "lr": lr, "batch_size": batch_size, "seed": seed}
            done = fine_prune(module, x, y, dataset.x_train, dataset.y_train, layer=layer, step=step,
                              max_fraction=max_fraction, max_accuracy_drop=max_accuracy_drop,
                              fraction=fraction, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                              triggers=triggers, real_trigger=real, progress=progress)
            fixed = done.model
            parts["layer"] = done.layer
            parts["fine_pruning"] = {"pruned": len(done.pruned), "units": done.units,
                                     "fraction": done.fraction, "neurons": done.pruned, "curve": done.curve,
                                     "max_accuracy_drop": max_accuracy_drop, "over_budget": done.over_budget,
                                     "pruned_only": _scores(done.pruned_model, dataset, triggers, real),
                                     "images": done.images, "loss": done.history.loss if done.history else []}
        else:
            settings = {"fraction": fraction, "stamp_fraction": stamp_fraction, "epochs": epochs, "lr": lr,
                        "batch_size": batch_size, "seed": seed}
            done = unlearn(module, dataset.x_train, dataset.y_train, triggers, progress=progress, **settings)
            fixed = done.model
            parts["unlearning"] = {"images": done.images, "stamped": done.stamped, "loss": done.history.loss}
            if baselines:
                parts["baselines"] = {"clean-only": _scores(unlearn(
                    module, dataset.x_train, dataset.y_train, [], progress=progress, **settings).model,
                    dataset, triggers, real)}
                if real is not None:
                    parts["baselines"]["real-trigger"] = _scores(unlearn(
                        module, dataset.x_train, dataset.y_train, [real], progress=progress,
                        **settings).model, dataset, triggers, real)
            params = settings
    record = _record("repair", method, setup, seed, start, params, before=before,
                     after=_scores(fixed, dataset, triggers, real), model=resolved.unwrap(fixed), **parts)
    if out is not None:
        save_model(record.model, out, metadata={
            "repaired_by": method, "repaired_from": resolved.sha256, "labels": record.labels,
            "input_convention": resolved.convention})
        record.out = str(out)
    if publish:
        _publish(record, scan, setup.result, real)
    return record
