"""Scoring a zoo as the field scores detectors: AUROC of a score, detection and false-positive
rates at its threshold, target-label accuracy, trigger IoU and seconds, per method and score."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from trojanscan.defenses.outliers import SIZE_RATIO_THRESHOLD, mad_anomaly_index
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.metrics import roc_auc, roc_curve

MIN_ASR = 0.5  # a "trojaned" model whose attack did not take is left out of the scores


def scan_row(result: ScanResult) -> dict[str, Any]:
    truth = result.extra.get("ground_truth") or {}
    norms = [r.l1_norm for r in result.labels]
    # from the norms, not the stored index: JSON keeps no infinity (a MAD of zero) for a reload
    index = mad_anomaly_index(norms).model_anomaly_index if len(norms) >= 3 else float("nan")
    return {"seed": result.seed, "anomaly_index": index,
            "size_ratio": result.size_ratio,
            "flagged_labels": result.flagged_labels, "infected": result.infected,
            "predicted_target": min(result.labels, key=lambda r: r.l1_norm).label,
            "target_flagged": truth.get("target_flagged"),
            "iou": (truth.get("overlap") or {}).get("iou"), "seconds": result.seconds}


def mean_finite(values: Any) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def attack_took(m: dict[str, Any]) -> bool:
    """A clean model, or a trojaned one whose attack reached ``MIN_ASR``."""
    asr = m["attack_success_rate"]
    return not m["trojaned"] or (asr is not None and math.isfinite(asr) and asr >= MIN_ASR)


SCORES = ("anomaly_index", "size_ratio")


def verdict(row: dict[str, Any], score: str) -> tuple[float, bool]:
    """(score, flagged) of a scan row under ``score``: the MAD anomaly index (higher is worse),
    or the size ratio (lower is worse; negated)."""
    if score == "anomaly_index":
        value = row["anomaly_index"]
        return (0.0 if math.isnan(value) else value), row["infected"]
    ratio = row["size_ratio"]
    return (-1.0 if math.isnan(ratio) else -ratio), bool(ratio < SIZE_RATIO_THRESHOLD)


def summarise(models: list[dict[str, Any]], method: str, which: str = "runs",
              score: str = "anomaly_index") -> dict[str, Any]:
    """The field's scores of ``method`` over the zoo: ``which`` is "runs" (each model's first
    seed), "combined" (norms averaged over the seeds) or "seed-K" (the K-th seed's runs);
    ``score`` is "anomaly_index" (the paper's MAD test) or "size_ratio" (smallest / median norm,
    flagged below ``SIZE_RATIO_THRESHOLD``)."""
    rows, usable = [], []
    for m in models:
        scans = m.get("scans", {}).get(method)
        if not scans:
            continue
        if which == "combined":
            row = scans.get("combined")
        else:
            k = int(which.split("-")[1]) if which.startswith("seed-") else 0
            row = scans["runs"][k] if k < len(scans["runs"]) else None
        if row is None:
            continue
        if not attack_took(m):
            continue
        rows.append(row)
        usable.append(m)
    if not rows:
        return {"models": 0}
    trojaned = [m["trojaned"] for m in usable]
    verdicts = [verdict(r, score) for r in rows]
    scores = [v[0] for v in verdicts]
    bad = [(m, r, v) for m, r, v in zip(usable, rows, verdicts, strict=True) if m["trojaned"]]
    good = [(m, r, v) for m, r, v in zip(usable, rows, verdicts, strict=True) if not m["trojaned"]]
    ious = [r["iou"] for m, r, _ in bad if m["trigger_kind"] == "patch" and r.get("iou") is not None
            and math.isfinite(r["iou"])]
    fpr, tpr, _ = roc_curve(scores, trojaned)

    def rate(triples: list[tuple[dict, dict, tuple]], test: Callable[..., bool]) -> float | None:
        return sum(bool(test(*t)) for t in triples) / len(triples) if triples else None

    def hit(m: dict, r: dict, v: tuple) -> bool:  # flagged, and the flagged label is the target
        if score == "anomaly_index":
            return v[1] and m["target"] in r["flagged_labels"]
        return v[1] and r["predicted_target"] == m["target"]

    return {
        "score": score, "models": len(rows), "trojaned": len(bad), "clean": len(good),
        "auroc": roc_auc(scores, trojaned),
        "detection_rate": rate(bad, lambda m, r, v: v[1]),
        "false_positive_rate": rate(good, lambda m, r, v: v[1]),
        "target_accuracy": rate(bad, lambda m, r, v: r["predicted_target"] == m["target"]),
        "detected_with_target": rate(bad, hit),
        "mean_iou_patch": statistics.fmean(ious) if ious else None,
        "mean_scan_seconds": statistics.fmean(r["seconds"] for r in rows),
        "missed": [m["name"] for m, r, v in bad if not v[1]],
        "wrong_target": [m["name"] for m, r, v in bad if r["predicted_target"] != m["target"]],
        "false_positives": [m["name"] for m, r, v in good if v[1]],
        "roc": {"fpr": fpr, "tpr": tpr},
    }


def summarise_strip(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean FRR over all models and FAR over the trojaned ones, at the 1% FRR boundary."""
    rows = [(m, m["strip"]) for m in models if m.get("strip")]
    bad = [(m, r) for m, r in rows if m["trojaned"] and attack_took(m)]
    return {"models": len(rows),
            "mean_frr": statistics.fmean(r["frr"] for _, r in rows) if rows else None,
            "mean_far": statistics.fmean(r["far"] for _, r in bad) if bad else None,
            "far_above_2pct": [m["name"] for m, r in bad if r["far"] > 0.02]}
