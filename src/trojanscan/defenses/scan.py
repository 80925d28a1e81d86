"""The scan runner shared by every trigger-search method: checks, resume, progress, verdict."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trojanscan.defenses.base import Provenance
from trojanscan.defenses.outliers import mad_anomaly_index
from trojanscan.defenses.scan_result import (
    LABELS_DIR,
    SCAN_JSON,
    LabelResult,
    ScanResult,
    label_file,
    load_label,
    save_label,
)
from trojanscan.defenses.trigger_search import (
    LabelSearch,
    Regularizer,
    SearchSchedule,
    search_triggers,
)
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import module_sha256, read_json, tensor_sha256
from trojanscan.metrics import clean_accuracy
from trojanscan.progress import ProgressCallback, ProgressEvent
from trojanscan.train import predict
from trojanscan.validation import check_clean_data, check_model_fits

ALGORITHM_VERSION = 1  # bump when a change makes saved per-label results stale


def _drop_stale_result(out: Path, fingerprint: str) -> None:
    """A scan.json from other settings must not outlive the labels about to be overwritten."""
    stale = out / SCAN_JSON
    if stale.exists():
        try:
            old = read_json(stale, "scan result").get("parameters", {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != fingerprint:
            stale.unlink()


MEASURED = "step_attack_success_rate"  # set in ``extra`` once the kept trigger's ASR is measured


@torch.no_grad()
def _measure_kept_trigger(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, r: LabelResult) -> None:
    """The ASR of the kept trigger on all clean images not already of its label.

    The search records the mean ASR of the step a trigger was kept in, measured while the mask
    was still changing; this is the success rate of the trigger actually reported. It is measured
    before the label is saved, so a resumed scan reports the same figure.
    """
    keep = x if y is None else x[y != r.label]
    if MEASURED in r.extra or len(keep) == 0:
        return
    hits = predict(model, keep, batch_size=512, transform=r.trigger().apply)
    r.extra[MEASURED] = r.attack_success_rate
    r.attack_success_rate = float((hits == r.label).float().mean())


def _to_label_result(r: LabelSearch) -> LabelResult:
    return LabelResult(label=r.label, l1_norm=r.l1_norm, attack_success_rate=r.attack_success_rate,
                       converged=r.converged, steps=r.steps, image_passes=r.image_passes,
                       seconds=r.seconds, stop_reason=r.stop_reason, final_cost=r.final_cost,
                       mask=r.mask, pattern=r.pattern)


VERDICT_WARNINGS = ("fewer than 3 labels scanned", "never reached the ASR threshold")


def conclude(result: ScanResult) -> ScanResult:
    """Set the outlier verdict of ``result`` from its labels' trigger norms: each label's MAD anomaly
    index, the flagged labels, the model's index; warn about too few labels and unconverged ones.
    Merging the labels of several partial scans and concluding gives the verdict of one scan."""
    results = result.labels
    result.warnings = [w for w in result.warnings if not any(v in w for v in VERDICT_WARNINGS)]
    if len(results) >= 3:
        report = mad_anomaly_index([r.l1_norm for r in results], result.threshold)
        for r, ai in zip(results, report.anomaly_index, strict=True):
            r.anomaly_index = ai
        result.flagged_labels = [results[i].label for i in report.flagged]
        result.anomaly_index, result.median_l1, result.mad = (
            report.model_anomaly_index, report.median, report.mad)
    else:
        result.warnings.append("fewer than 3 labels scanned: no outlier test, no verdict")
        result.flagged_labels = []
        result.anomaly_index = result.median_l1 = result.mad = float("nan")
    result.infected = bool(result.flagged_labels)
    not_converged = [r.label for r in results if not r.converged]
    if not_converged:
        result.warnings.append(f"labels {not_converged} never reached the ASR threshold: their trigger "
                               "is the last one tried")
    return result


def run_scan(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor | None,
             num_classes: int, *, method: str, schedule: SearchSchedule,
             regularizer: Regularizer | None = None, labels: list[int] | None = None,
             chunk: int = 10, threshold: float = 2.0, seed: int = 0,
             out_dir: str | Path | None = None, on_progress: ProgressCallback | None = None,
             provenance: Provenance | None = None, method_params: dict[str, Any] | None = None,
             ) -> ScanResult:
    """Search a trigger for every label, flag outliers, and (with ``out_dir``) write resumably.

    ``on_progress`` receives a :class:`ProgressEvent` per label and step (``done`` when the label
    finishes); nothing is drawn here.
    """
    provenance = provenance or Provenance()
    input_convention = provenance.input_convention
    check_clean_data(x_clean, y_clean, num_classes)
    check_model_fits(model, tuple(x_clean.shape[1:]), num_classes)
    labels = list(range(num_classes)) if labels is None else sorted({int(v) for v in labels})
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise TrojanscanError(f"labels to scan must be within 0..{num_classes - 1}, got {bad or labels}")
    warnings: list[str] = []
    accuracy = None
    if y_clean is not None:
        accuracy = clean_accuracy(predict(model, x_clean), y_clean)
        chance = 1.0 / num_classes
        if accuracy < chance + 0.1 * (1 - chance):
            raise TrojanscanError(
                f"the model is near chance on the clean data (accuracy {accuracy:.1%}, chance "
                f"{chance:.1%}): wrong data or a preprocessing mismatch? Pass the model's "
                "--mean/--std if it expects normalised inputs")
        if accuracy < 0.8:
            warnings.append(f"clean accuracy is only {accuracy:.1%}: check the data and the "
                            "input convention before trusting the verdict")
    model_sha256 = provenance.model_sha256 or module_sha256(model)
    data_sha256 = provenance.data_sha256 or tensor_sha256(x_clean)
    params = {"method": method, "schedule": schedule.to_dict(), "chunk": chunk,
              "threshold": threshold, "clean_samples": len(x_clean), "labels": labels,
              "precision": provenance.precision, **(method_params or {})}
    # float32 stays out of the fingerprint, so that scans made before --precision still resume
    reduced = {} if provenance.precision == "float32" else {"precision": provenance.precision}
    fingerprint = hashlib.sha256(json.dumps(
        {"model": model_sha256, "data": data_sha256, "seed": seed, "method": method,
         "schedule": schedule.to_dict(), "input_convention": input_convention,
         "version": ALGORITHM_VERSION, **reduced, **(method_params or {})}, sort_keys=True,
        default=str).encode()).hexdigest()
    params["fingerprint"] = fingerprint
    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, LabelResult] = {}
    if out is not None:
        (out / LABELS_DIR).mkdir(parents=True, exist_ok=True)
        _drop_stale_result(out, fingerprint)
        for v in labels:
            r = load_label(label_file(out, v), fingerprint) if label_file(out, v).exists() else None
            if r is not None:
                done[v] = r
    todo = [v for v in labels if v not in done]
    start = time.perf_counter()

    def on_step(label: int, step: int, stats: dict[str, float]) -> None:
        if on_progress is not None:
            best = stats["best_l1"]
            on_progress(ProgressEvent(
                f"label {label:>3}", step, schedule.steps,
                f"ASR {stats['asr']:.2f} L1 {stats['l1']:.1f} best "
                f"{'—' if best == float('inf') else f'{best:.1f}'} λ {stats['cost']:.2g}",
                done=bool(stats["done"])))

    def on_label_done(r: LabelSearch) -> None:
        res = _to_label_result(r)
        if math.isfinite(res.l1_norm):
            _measure_kept_trigger(model, x_clean, y_clean, res)
        done[r.label] = res
        if out is not None:
            save_label(out, res, fingerprint)

    # the finished labels keep their batch places (``replay``) so the others come out bit-identical
    if todo:
        search_triggers(model, x_clean, labels, schedule, chunk=chunk, seed=seed, regularizer=regularizer,
                        y_clean=y_clean, on_step=on_step, on_label_done=on_label_done,
                        replay={v: r.steps for v, r in done.items()})
    results = [done[v] for v in labels]
    bad = [r.label for r in results if not math.isfinite(r.l1_norm)]
    if bad:
        raise TrojanscanError(f"the trigger search diverged (non-finite mask norm) for labels {bad}; "
                              "the model may produce NaN on [0, 1] inputs")
    for r in results:  # labels saved by versions that did not measure before saving
        _measure_kept_trigger(model, x_clean, y_clean, r)
    result = ScanResult(
        method=method, labels=results, flagged_labels=[], infected=False,
        anomaly_index=float("nan"), threshold=threshold, median_l1=float("nan"), mad=float("nan"),
        parameters=params, seed=seed, model_sha256=model_sha256, data_sha256=data_sha256,
        seconds=time.perf_counter() - start + sum(done[v].seconds for v in labels if v not in todo),
        input_convention=input_convention, clean_accuracy=accuracy, warnings=warnings)
    conclude(result)
    if out is not None:
        result.save(out)
    return result
