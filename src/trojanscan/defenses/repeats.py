"""Several scans of one model with different seeds, combined: the per-label trigger norms are
averaged before the MAD outlier test, as the Neural Cleanse authors recommend."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from trojanscan.defenses.outliers import mad_anomaly_index, size_ratio
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.errors import TrojanscanError


@dataclass
class RepeatedScan:
    """The combined verdict of several scans and how much their anomaly indices spread."""

    runs: list[ScanResult]
    labels: list[int]
    mean_l1: list[float]
    label_anomaly_index: list[float]
    flagged_labels: list[int]
    anomaly_index: float
    threshold: float

    @property
    def infected(self) -> bool:
        return bool(self.flagged_labels)

    @property
    def size_ratio(self) -> float:
        """Smallest averaged trigger norm over the median one."""
        return size_ratio(self.mean_l1)

    @property
    def predicted_target(self) -> int:
        """The label whose averaged trigger is smallest."""
        return self.labels[min(range(len(self.labels)), key=self.mean_l1.__getitem__)]

    def spread(self) -> dict[str, Any]:
        """The model anomaly index of each run, and the mean, standard deviation and range of the
        finite ones (an infinite index, from a MAD of zero, or a NaN one is listed but not averaged)."""
        values = [r.anomaly_index for r in self.runs]
        finite = [v for v in values if math.isfinite(v)]
        nan = float("nan")
        return {"seeds": [r.seed for r in self.runs], "anomaly_index": values,
                "mean": statistics.fmean(finite) if finite else nan,
                "std": statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else nan),
                "min": min(finite, default=nan), "max": max(finite, default=nan),
                "flagged_by_runs": [r.flagged_labels for r in self.runs]}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.runs[0].method, "repeats": len(self.runs), "infected": self.infected,
                "flagged_labels": self.flagged_labels, "anomaly_index": self.anomaly_index,
                "threshold": self.threshold, "predicted_target": self.predicted_target,
                "size_ratio": self.size_ratio,
                "labels": [{"label": k, "mean_l1": n, "anomaly_index": a} for k, n, a in
                           zip(self.labels, self.mean_l1, self.label_anomaly_index, strict=True)],
                "spread": self.spread(), "seconds": sum(r.seconds for r in self.runs)}


def combine_runs(runs: list[ScanResult], threshold: float = 2.0) -> RepeatedScan:
    """Average each label's reversed-trigger L1 norm over ``runs`` and flag outliers of the means."""
    if not runs:
        raise TrojanscanError("no scans to combine")
    labels = sorted(r.label for r in runs[0].labels)
    for run in runs[1:]:
        if sorted(r.label for r in run.labels) != labels:
            raise TrojanscanError("the scans to combine cover different labels")
    mean_l1 = [statistics.fmean(run.label(k).l1_norm for run in runs) for k in labels]
    if len(labels) < 3:  # as for one scan: too few labels for an outlier test, so no verdict
        return RepeatedScan(runs, labels, mean_l1, [float("nan")] * len(labels), [], float("nan"),
                            threshold)
    report = mad_anomaly_index(mean_l1, threshold)
    return RepeatedScan(runs, labels, mean_l1, report.anomaly_index,
                        [labels[i] for i in report.flagged], report.model_anomaly_index, threshold)
