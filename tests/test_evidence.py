"""Evidence beyond the per-label trigger size: MM-BD's maximum-margin statistic and its p-value, and
the label-pair (source-specific) trigger search with its symmetry ratio."""

from __future__ import annotations

import math

import pytest
import torch

from trojanscan.attacks import AllToAll
from trojanscan.defenses.mmbd import MMBD, margins, order_statistic_p_value
from trojanscan.defenses.pairs import PairEvidence, PairSearch, prescreen
from trojanscan.errors import TrojanscanError


def test_margins_are_own_logit_minus_best_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert margins(logits, torch.tensor([0, 0])).tolist() == [1.0, -5.0]
    assert margins(logits, torch.tensor([2, 1])).tolist() == [-1.0, 5.0]


def test_order_statistic_p_value_on_a_synthetic_null():
    gamma = torch.distributions.Gamma(torch.tensor(6.0), torch.tensor(0.5))
    torch.manual_seed(0)
    null = gamma.sample((9,)).tolist()
    assert order_statistic_p_value(null + [max(null) * 4])[0] < 0.01  # an outlier target class
    assert order_statistic_p_value(null + [sorted(null)[4]])[0] > 0.05  # no outlier: not flagged
    # calibrated: when all K statistics come from the null, p < 0.05 about 5% of the time
    flagged = sum(order_statistic_p_value(gamma.sample((10,)).tolist())[0] < 0.05 for _ in range(300))
    assert 0 < flagged / 300 < 0.15, flagged
    with pytest.raises(TrojanscanError, match="at least 3"):
        order_statistic_p_value([1.0, 2.0])
    with pytest.raises(TrojanscanError, match="NaN"):
        order_statistic_p_value([1.0, 2.0, math.nan])


def test_mmbd_flags_a_blended_backdoor_without_data(digits):
    from trojanscan import Blend, train_classifier

    model = train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                             attack=Blend(target=4, alpha=0.2)).model
    weights = [p.clone() for p in model.parameters()]
    evidence = MMBD(starts=10, steps=150).inspect(model, num_classes=10, input_shape=digits.input_shape)
    assert evidence.flagged_labels == [4] and evidence.p_value < 0.05
    assert max(range(10), key=lambda k: evidence.statistics[k]) == 4
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert evidence.to_dict()["infected"] is True


def test_pair_search_sees_an_all_to_all_backdoor_asymmetrically(digits):
    from trojanscan import train_classifier

    trained = train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                               attack=AllToAll(poison_rate=0.15, size=3))
    x, y = digits.x_test[:600], digits.y_test[:600]
    evidence = PairSearch(steps=100).search(trained.model, x, y, num_classes=10,
                                            pairs=[(0, 1), (1, 2), (5, 6)], reverse="all")
    for p in evidence.pairs:  # the injected direction is small, its reverse (a natural one) is not
        assert p.l1_norm < 12 and p.ratio > 1.5, p
        assert p.attack_success_rate >= 0.99
    again = PairEvidence.from_dict(evidence.to_dict())
    assert [p.l1_norm for p in again.pairs] == [p.l1_norm for p in evidence.pairs]
    screened = prescreen(trained.model, x, y, 10, 2)
    assert len(screened) == 20 and all(s != t for s, t, _ in screened)
    with pytest.raises(TrojanscanError, match="different labels"):
        PairSearch().search(trained.model, x, y, num_classes=10, pairs=[(3, 3)])
