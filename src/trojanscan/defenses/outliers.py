"""Outlier test on per-label trigger sizes: the MAD anomaly index of Neural Cleanse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAD_CONSISTENCY = 1.4826  # makes the MAD estimate the standard deviation of normal data
# below this, the smallest trigger is suspiciously small next to the typical label's (see size_ratio)
SIZE_RATIO_THRESHOLD = 0.4


@dataclass
class OutlierReport:
    """Anomaly index per label, which labels are flagged, and the statistics behind them."""

    norms: list[float]
    anomaly_index: list[float]
    flagged: list[int]  # positions into the input, smallest norm first
    median: float
    mad: float
    threshold: float

    @property
    def model_anomaly_index(self) -> float:
        """The index of the smallest-norm label: the model's score."""
        if not self.anomaly_index:
            return float("nan")
        return float(self.anomaly_index[int(np.argmin(self.norms))])


def mad_anomaly_index(norms: Sequence[float], threshold: float = 2.0) -> OutlierReport:
    """Anomaly index ``|l_k - median| / (1.4826 · MAD)``; flag only labels *below* the median.

    The median has numpy semantics (mean of the two middle values for an even count). A MAD of
    zero (all norms equal) gives index 0 for labels at the median and +inf for the others.
    """
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("need a non-empty 1-D sequence of norms")
    if not np.all(np.isfinite(values)):
        raise ValueError("norms must be finite")
    median = float(np.median(values))
    deviation = np.abs(values - median)
    mad = MAD_CONSISTENCY * float(np.median(deviation))
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.where(deviation == 0, 0.0, deviation / mad if mad > 0 else np.inf)
    low = values < median
    flagged = [int(i) for i in np.argsort(values, kind="stable") if low[i] and index[i] > threshold]
    return OutlierReport([float(v) for v in values], [float(v) for v in index], flagged, median,
                         mad, float(threshold))


def size_ratio(norms: Sequence[float]) -> float:
    """The smallest trigger norm over the median one: how many times easier the easiest label is
    to reach than a typical label. Scale-free, and unlike the MAD index not widened by labels
    whose triggers are large (NaN for an empty or non-positive median)."""
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.all(np.isfinite(values)):
        return float("nan")
    median = float(np.median(values))
    return float(values.min() / median) if median > 0 else float("nan")
