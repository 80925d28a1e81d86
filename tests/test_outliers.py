"""The MAD anomaly index, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trojanscan.defenses.outliers import mad_anomaly_index


def test_odd_count_by_hand():
    # median 10; |l - 10| = 8, 1, 0, 1, 2 → median deviation 1 → MAD 1.4826
    r = mad_anomaly_index([2, 9, 10, 11, 12])
    assert r.median == 10 and r.mad == pytest.approx(1.4826)
    assert r.anomaly_index[0] == pytest.approx(8 / 1.4826)
    assert r.flagged == [0] and r.model_anomaly_index == pytest.approx(5.3959, abs=1e-4)


def test_even_count_uses_the_mean_of_the_middle_values():
    # numpy median of [1, 8, 10, 12] is 9 (torch.median would say 8)
    r = mad_anomaly_index([1, 8, 10, 12])
    assert r.median == 9
    # deviations 8, 1, 1, 3 → median 2 → MAD 2.9652
    assert r.mad == pytest.approx(2 * 1.4826)
    assert r.anomaly_index == pytest.approx([8 / 2.9652, 1 / 2.9652, 1 / 2.9652, 3 / 2.9652])
    assert r.flagged == [0]


def test_only_the_low_side_is_flagged():
    r = mad_anomaly_index([10, 10.5, 9.5, 10, 40])  # label 4 is a *large* outlier
    assert r.anomaly_index[4] > 2 and r.flagged == []


def test_threshold_is_an_option_and_flags_are_sorted_by_norm():
    norms = [50, 3, 52, 49, 51, 5, 48, 50]
    assert mad_anomaly_index(norms).flagged == [1, 5]
    assert mad_anomaly_index(norms, threshold=1e6).flagged == []


def test_constant_norms_flag_nothing():
    r = mad_anomaly_index([7.0] * 6)
    assert r.mad == 0 and r.flagged == [] and r.model_anomaly_index == 0


def test_rejects_nan_and_empty():
    with pytest.raises(ValueError):
        mad_anomaly_index([1.0, math.nan, 2.0])
    with pytest.raises(ValueError):
        mad_anomaly_index(np.array([]))
