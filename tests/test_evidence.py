"""Evidence beyond the per-label trigger size: MM-BD's maximum-margin statistic and its p-value, and
the label-pair (source-specific) trigger search with its symmetry ratio, and the universal untargeted
trigger's label map."""

from __future__ import annotations

import math

import pytest
import torch

from trojanscan.attacks import AllToAll
from trojanscan.defenses.mmbd import MMBD, margins, order_statistic_p_value
from trojanscan.defenses.pairs import PairEvidence, PairSearch, prescreen
from trojanscan.defenses.untargeted import SourceShift, UntargetedEvidence, UntargetedSearch, label_shifts
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


@pytest.fixture(scope="module")
def all_to_all_digits(digits):
    """A mnist-cnn on the digits with a 3×3 patch that sends label i to i+1."""
    from trojanscan import train_classifier

    return train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                            attack=AllToAll(poison_rate=0.15, size=3))


def test_pair_search_sees_an_all_to_all_backdoor_asymmetrically(digits, all_to_all_digits):
    trained = all_to_all_digits
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


def test_pair_search_spends_no_reverse_on_a_pair_the_source_already_leans_to(monkeypatch):
    from types import SimpleNamespace

    from trojanscan.defenses import pairs as pair_module
    from trojanscan.defenses.pairs import PAIR_PRIOR

    # logits per class image (one-hot pixels): class 0 already goes to 1 half the time (softmax 0.5 >=
    # PAIR_PRIOR); every other class leans to its next-best label with under 1%
    logits = torch.tensor([[0.0, 0, -9, -9], [-9, 5, -9, 0], [-9, -9, 5, 0], [0, -9, -9, 5]])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(logits.T)
    y = torch.arange(4).repeat(10)
    x = torch.nn.functional.one_hot(y, 4).float().view(-1, 1, 2, 2)
    asked: list[list[tuple[int, int]]] = []
    norms = {(0, 1): 1.0, (2, 3): 1.0}  # the small forward pairs; the others 9 (median 5)

    def fake_search(model, pools, targets, keys, schedule, *, chunk, seed):
        arms = [(k // 4, k % 4) for k in keys]
        asked.append(arms)
        return [SimpleNamespace(label=k, l1_norm=norms.get(a, 9.0), attack_success_rate=1.0, image_passes=1)
                for k, a in zip(keys, arms, strict=True)]

    monkeypatch.setattr(pair_module, "search_pair_triggers", fake_search)
    evidence = PairSearch(candidates=1, mini_batches=1).search(model, x, y, num_classes=4)
    assert asked[0] == [(0, 1), (1, 3), (2, 3), (3, 0)]
    assert evidence.pairs[0].prescreen_probability >= PAIR_PRIOR > evidence.pairs[2].prescreen_probability
    assert asked[1:] == [[(3, 2)]]  # (2, 3) is reversed; (0, 1) leans already and is not
    assert evidence.options["mini_batches"] == 1
    with pytest.raises(TrojanscanError, match="mini_batches"):
        PairSearch(mini_batches=0)


def test_label_shifts_on_hand_made_predictions():
    before = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    after = torch.tensor([1, 1, 1, 0, 2, 0, 2, 2])
    shifts = {s.source: s for s in label_shifts(before, after, 4)}
    assert (shifts[0].target, shifts[0].moved, shifts[0].share) == (1, 0.75, 1.0) and shifts[0].mapped
    assert shifts[1].moved == 1.0 and shifts[1].share == 0.5 and shifts[1].mapped  # a tie: one of the two
    assert shifts[2].moved == 0.0 and not shifts[2].mapped  # nothing moved
    assert 3 not in shifts  # no images of label 3


def test_untargeted_trigger_maps_an_all_to_all_backdoor_and_not_a_clean_model(digits, all_to_all_digits,
                                                                            clean_digits):
    x, y = digits.x_test[:600], digits.y_test[:600]
    weights = [p.clone() for p in all_to_all_digits.model.parameters()]
    found = UntargetedSearch(steps=100, seed=0).inspect(all_to_all_digits.model, x, y, num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(weights, all_to_all_digits.model.parameters(), strict=True))
    shifted = [(s, t) for s, t in found.mapped_pairs() if t == (s + 1) % 10]
    assert len(shifted) >= 7 and found.spread >= 7, found.mapped_pairs()  # the injected map, i → i+1
    assert found.success_rate >= 0.6 and found.l1_norm < 15
    clean = UntargetedSearch(steps=100, seed=0).inspect(clean_digits.model, x, y, num_classes=10)
    assert clean.spread <= 3 and clean.l1_norm > 2 * found.l1_norm, clean.mapped_pairs()  # hub labels
    again = UntargetedEvidence.from_dict(found.to_dict())
    assert again.mapped_pairs() == found.mapped_pairs() and again.to_dict()["spread"] == found.spread
    with pytest.raises(TrojanscanError, match="labels"):
        UntargetedSearch().inspect(clean_digits.model, x, None, num_classes=10)
    with pytest.raises(TrojanscanError, match="starts"):
        UntargetedSearch(starts=0)
    assert isinstance(found.shifts[0], SourceShift)


def test_untargeted_trigger_map_follows_any_shift_not_only_the_next_label(digits):
    from trojanscan import train_classifier

    trained = train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                               attack=AllToAll(poison_rate=0.15, size=3, shift=3))
    x, y = digits.x_test[:600], digits.y_test[:600]
    found = UntargetedSearch(steps=100, seed=0).inspect(trained.model, x, y, num_classes=10)
    shifted = [(s, t) for s, t in found.mapped_pairs() if t == (s + 3) % 10]
    assert len(shifted) >= 7 and found.spread >= 7, found.mapped_pairs()  # measured: 9 of 9 mapped, i → i+3
