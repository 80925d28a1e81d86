"""The guard's pooled decision: member p-values with a fitted tail, leave-one-out calibration, the
pooled statistic on hand-made p-values, the FRR it gives on synthetic benign scores, and the guard's
use of it (decision, files written before it existed, one-line errors)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from trojanscan.defenses.consistency import upper_threshold
from trojanscan.defenses.guard import Guard
from trojanscan.defenses.pooling import (
    calibration_p_values,
    calibration_pooled_scores,
    member_p_values,
    pooled_scores,
    pooled_statistic,
    score_needed,
)
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import load_npz_record, save_npz_record


def test_member_p_values_are_conformal_inside_and_follow_a_fitted_tail_beyond():
    gen = torch.Generator().manual_seed(0)
    benign = torch.empty(2000, dtype=torch.float64).exponential_(generator=gen)  # sf(s) = exp(−s)
    ordered = benign.sort().values
    inside = ordered[[100, 1000, 1800]]
    counts = torch.tensor([(benign >= s).sum() for s in inside], dtype=torch.float64)
    torch.testing.assert_close(member_p_values(benign, inside), (1 + counts) / 2001)
    far = torch.tensor([math.log(1e3), math.log(1e5), math.log(1e8)], dtype=torch.float64)
    p = member_p_values(benign, far)
    assert (p[1:] < 1 / 2001).all() and (p.diff() < 0).all()  # beyond every benign score, still falling
    # an exponential benign tail is the tail model's own case: the exponent is estimated (from 100
    # excesses) within 25% far out (measured: 1.7e-3, 2.8e-5, 6.3e-8)
    truth = np.log([1e-3, 1e-5, 1e-8])
    assert (np.abs(np.log(p.numpy()) - truth) < 0.25 * np.abs(truth)).all(), p


def test_calibration_p_values_leave_each_score_out():
    gen = torch.Generator().manual_seed(1)
    benign = torch.cat([torch.randn(57, generator=gen), torch.tensor([0.5, 0.5, 3.0])]).double()  # ties
    brute = torch.stack([member_p_values(torch.cat([benign[:i], benign[i + 1:]]), benign[i:i + 1])[0]
                         for i in range(len(benign))])
    torch.testing.assert_close(calibration_p_values(benign), brute)


def test_the_pooled_statistic_on_hand_made_p_values():
    def p(value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.float64)

    one_strong = {"a": p(1e-10), "b": p(0.9), "c": p(0.9)}
    # Šidák's side: 1 − (1 − 1e-10)^3 ≈ 3e-10, stronger than Fisher's with two unremarkable members
    assert pooled_statistic(one_strong).item() == pytest.approx(-math.log(3e-10), rel=1e-6)
    spread = {m: p(1e-3) for m in "abc"}
    x = 3 * math.log(1e3)  # Fisher's side: P(Gamma(3) ≥ x) = e^−x (1 + x + x²/2)
    fisher = math.exp(-x) * (1 + x + x * x / 2)
    assert fisher < 1 - (1 - 1e-3) ** 3
    assert pooled_statistic(spread).item() == pytest.approx(-math.log(fisher), rel=1e-9)
    assert pooled_statistic({m: p(1.0) for m in "abc"}).item() == 0.0
    assert math.isfinite(pooled_statistic({"a": p(0.0), "b": p(1.0)}).item())
    with pytest.raises(TrojanscanError, match="at least one"):
        pooled_statistic({})


def test_the_pooled_threshold_gives_the_requested_frr_on_synthetic_benign_scores():
    gen = torch.Generator().manual_seed(2)
    n, frr = 2000, 0.01
    shared = torch.randn(n + 100_000, generator=gen)  # members that partly agree, as real ones do
    members = {m: (0.6 * shared + 0.8 * torch.randn(n + 100_000, generator=gen)).double() for m in "abc"}
    benign = {m: s[:n] for m, s in members.items()}
    fresh = {m: s[n:] for m, s in members.items()}
    t = upper_threshold(calibration_pooled_scores(benign), frr)
    assert float((pooled_scores(benign, fresh) > t).double().mean()) == pytest.approx(frr, abs=0.3 * frr)


def test_the_score_a_member_needs_splits_its_scores_as_the_pooled_rule_does():
    gen = torch.Generator().manual_seed(3)
    benign = {m: torch.randn(500, generator=gen).double() for m in "abc"}
    t = upper_threshold(calibration_pooled_scores(benign), 0.02)
    others = {"a": torch.tensor([0.0, 2.5, 40.0, -3.0]).double(),
              "b": torch.tensor([0.0, 2.5, 0.0, -3.0]).double()}
    cut = score_needed(benign, others, "c", t, 4)
    assert cut[2] == -math.inf  # "a" alone is far past every benign score: flagged whatever "c" says
    assert math.isfinite(cut[0]) and cut[1] < cut[0]  # odder other members: "c" needs less
    grid = torch.linspace(-4.0, 60.0, 3201, dtype=torch.float64)
    for i in (0, 1, 3):
        rows = {m: s[i].repeat(len(grid)) for m, s in others.items()}
        flagged = pooled_scores(benign, {**rows, "c": grid}) > t
        assert torch.equal(flagged, grid > cut[i]), i


def test_errors_are_one_line():
    with pytest.raises(TrojanscanError, match="at least 7 benign scores"):
        member_p_values(torch.zeros(3), torch.zeros(1))
    with pytest.raises(TrojanscanError, match="NaN or infinity"):
        calibration_p_values(torch.tensor([0.0] * 9 + [math.nan]))
    with pytest.raises(TrojanscanError, match="same benign inputs"):
        calibration_pooled_scores({"a": torch.zeros(10), "b": torch.zeros(11)})
    with pytest.raises(TrojanscanError, match="missing for detector"):
        pooled_scores({"a": torch.zeros(10), "b": torch.zeros(10)}, {"a": torch.zeros(2)})


# --- in the guard ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard(trojaned_digits, digits):
    return Guard(trojaned_digits.model, detectors=("strip", "teco"), frr=0.05,
                 rule="pooled").fit(digits.x_train[:300])


def test_the_pooled_guard_catches_what_each_member_finds_only_somewhat_odd(guard):
    assert guard.rule == "pooled" and math.isfinite(guard.pooled_threshold_)
    t = guard.thresholds_  # each member's OR share of the benign tail
    at_shares = {m: torch.tensor([t[m]], dtype=torch.float64) for m in guard.detectors}
    typical = {m: guard.calibration_scores_[m].median().view(1) for m in guard.detectors}
    assert guard.decide(at_shares).item()  # both at their OR thresholds: the OR rule lets it pass
    assert not guard.decide(typical).item()
    or_guard = copy.copy(guard)
    or_guard.rule = "or"
    assert not or_guard.decide(at_shares).item()
    stat = guard.pooled(at_shares)
    assert stat.item() > guard.pooled_threshold_


def test_pooled_files_round_trip_and_older_files_keep_the_or_rule(guard, trojaned_digits, digits, tmp_path):
    guard.save(tmp_path / "g.npz")
    loaded = Guard.load(tmp_path / "g.npz", trojaned_digits.model)
    assert loaded.rule == "pooled" and loaded.pooled_threshold_ == guard.pooled_threshold_
    x = digits.x_test[:30]
    assert torch.equal(loaded.detect(x), guard.detect(x))
    fields = load_npz_record(tmp_path / "g.npz", "guard calibration")
    del fields["option.rule"]  # as written before the pooled rule existed
    save_npz_record(tmp_path / "old.npz", fields)
    old = Guard.load(tmp_path / "old.npz", trojaned_digits.model)
    assert old.rule == "or" and old.pooled_threshold_ == guard.pooled_threshold_


def test_a_pooled_guard_of_strip_alone_screens_as_it_scores(trojaned_digits, digits):
    alone = Guard(trojaned_digits.model, detectors=("strip",), frr=0.05,
                  rule="pooled").fit(digits.x_train[:300])
    x = torch.cat([digits.x_test[:40], trojaned_digits.trigger.apply(digits.x_test[40:80])])
    flags, by = alone.screen(x)
    assert torch.equal(flags, alone.decide(alone.scores(x))) and flags[40:].float().mean() > 0.9
    assert set(by[flags].tolist()) == {0}


def test_an_unknown_rule_is_a_one_line_error(trojaned_digits):
    with pytest.raises(TrojanscanError, match="unknown rule 'and'") as bad:
        Guard(trojaned_digits.model, rule="and")
    assert "\n" not in str(bad.value)
