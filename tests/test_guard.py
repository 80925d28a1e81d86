"""The combined guard and its new members (TeCo, SCALE-UP): their scores on the planted digits
backdoor, calibration for a requested FRR, the OR decision, files, one-line errors and the CLI (the
pooled decision: test_pooling.py)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trojanscan.cli import app
from trojanscan.data.triggers import trigger_path_for
from trojanscan.defenses.consistency import tail_count, upper_threshold
from trojanscan.defenses.guard import LOW_PASS_TECO, Guard, joint_thresholds
from trojanscan.defenses.scale_up import ScaleUp
from trojanscan.defenses.teco import TeCo, normal_scores
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import load_npz_record, save_npz_record
from trojanscan.metrics import far_frr, roc_auc
from trojanscan.models import save_model

runner = CliRunner()


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def inputs(trojaned_digits, digits):
    """Calibration images (training split), and clean and stamped test images."""
    trigger = trojaned_digits.trigger
    stamped = trigger.apply(digits.x_test[digits.y_test != trigger.target][:150])
    return digits.x_train[:300], digits.x_test[:150], stamped


@pytest.fixture(scope="module")
def guard(trojaned_digits, inputs):
    """All three members under one calibration at FRR 5% (300 images: 14 may be flagged)."""
    return Guard(trojaned_digits.model, detectors=("teco", "strip", "scale-up"), frr=0.05).fit(inputs[0])


# --- calibration maths ----------------------------------------------------------------------------


def test_the_threshold_gives_the_requested_frr_on_a_synthetic_benign_sample():
    gen = torch.Generator().manual_seed(0)
    for frr, n in ((0.01, 2000), (0.05, 300)):
        calibration, fresh = torch.randn(n, generator=gen), torch.randn(200_000, generator=gen)
        t = upper_threshold(calibration, frr)
        assert int((calibration > t).sum()) == tail_count(n, frr)  # ⌊frr·(n+1)⌋ − 1 benign above it
        # a fresh benign input is flagged with probability (k+1)/(n+1) ≤ frr, give or take sampling
        assert float((fresh > t).float().mean()) == pytest.approx(frr, abs=0.4 * frr)
    with pytest.warns(TrojanscanWarning, match="too few"):
        assert upper_threshold(torch.arange(10.0), 0.01) == 9.0  # the largest: nothing benign above it


def test_joint_calibration_splits_the_frr_between_members():
    gen = torch.Generator().manual_seed(1)
    n, frr = 4000, 0.02
    allowed = tail_count(n, frr)  # 79
    same = torch.randn(n, generator=gen)
    thresholds, k = joint_thresholds({"a": same, "b": same.clone()}, frr)
    assert k == allowed  # members that agree share the whole budget
    independent = {"a": torch.randn(n, generator=gen), "b": torch.randn(n, generator=gen)}
    thresholds, k = joint_thresholds(independent, frr)
    union = (independent["a"] > thresholds["a"]) | (independent["b"] > thresholds["b"])
    assert int(union.sum()) <= allowed and allowed // 2 <= k < allowed  # about half each, never less
    fresh = {m: torch.randn(100_000, generator=gen) for m in ("a", "b")}
    flagged = (fresh["a"] > thresholds["a"]) | (fresh["b"] > thresholds["b"])
    assert float(flagged.float().mean()) == pytest.approx(frr, abs=0.004)  # the stated overall FRR


def test_the_or_decision_on_hand_made_scores(guard):
    guard = copy.copy(guard)
    guard.rule = "or"  # the same calibration: the members' OR thresholds are fitted under both rules
    t = guard.thresholds_
    below = {m: torch.tensor([t[m] - 1.0, t[m] - 1.0, t[m] - 1.0, t[m]], dtype=torch.float64)
             for m in guard.detectors}
    scores = {m: s.clone() for m, s in below.items()}
    scores["teco"][0] = t["teco"] + 1e-6  # one member over its threshold is enough
    scores["strip"][1] = t["strip"] + 5.0
    scores["scale-up"][1] = t["scale-up"] + 5.0
    assert guard.decide(scores).tolist() == [True, True, False, False]  # at the threshold is not over it
    assert not guard.decide(below).any()
    with pytest.raises(TrojanscanError, match="missing for detector"):
        guard.decide({"teco": below["teco"]})


def test_normal_scores_rank_against_the_benign_values():
    reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fresh = normal_scores(reference, torch.tensor([[1.5], [-9.0], [9.0]]))[:, 0]
    assert fresh[0] == pytest.approx(0.0, abs=1e-9)  # the middle of four
    assert fresh[1] == pytest.approx(-fresh[2]) and fresh[2] > 1  # beyond every benign value, finitely
    own = normal_scores(reference, reference, leave_one_out=True)[:, 0]
    assert torch.isfinite(own).all() and own.tolist() == sorted(own.tolist())


# --- the planted backdoor -------------------------------------------------------------------------


def test_each_detector_separates_stamped_from_clean(guard, inputs):
    _, benign, stamped = inputs
    b, t = guard.scores(benign), guard.scores(stamped)
    auroc = {m: roc_auc(torch.cat([b[m], t[m]]).tolist(), [False] * len(b[m]) + [True] * len(t[m]))
             for m in guard.detectors}
    # measured: strip 1.00, teco 0.99, scale-up 0.80 (amplifying a digit mostly thickens its strokes,
    # which keeps a benign label too; SCALE-UP is weak on these images, and on our GTSRB blends)
    assert auroc["strip"] > 0.98 and auroc["teco"] > 0.95 and auroc["scale-up"] > 0.7, auroc
    assert all(float(t[m].mean()) > float(b[m].mean()) for m in guard.detectors)


@pytest.mark.parametrize("rule", ["pooled", "or"])
def test_the_guard_flags_the_planted_backdoor_and_screening_agrees_with_the_scores(rule, guard, inputs):
    guard = copy.copy(guard)
    guard.rule = rule  # one calibration fits both rules' thresholds
    _, benign, stamped = inputs
    mixed = torch.cat([benign, stamped])
    flags, by = guard.screen(mixed)
    assert torch.equal(flags, guard.decide(guard.scores(mixed)))
    rates = far_frr(flags[:len(benign)], flags[len(benign):])
    assert rates["far"] < 0.05 and rates["frr"] < 0.12, rates  # measured: FAR 0%, FRR 4.7% (target 5%)
    assert set(by[flags].tolist()) <= {0, 1, 2} and (by[~flags] == -1).all()
    labels, again = guard.predict(stamped)
    assert torch.equal(again, flags[len(benign):]) and float((labels == 0).float().mean()) > 0.9


def test_the_low_pass_teco_option_sets_the_guards_teco(trojaned_digits):
    default = Guard(trojaned_digits.model).members["teco"].detector
    assert (default.severity, default.deviation, len(default.corruptions)) == (2, "mahalanobis", 8)
    teco = Guard(trojaned_digits.model, **LOW_PASS_TECO).members["teco"].detector
    assert (teco.corruptions, teco.severity, teco.deviation) == (
        ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "pixelate"), 4, "std")


def test_early_exit_gives_the_full_verdict(trojaned_digits, inputs):
    calibration, benign, stamped = inputs
    mixed = torch.cat([benign, stamped])
    scale_up = ScaleUp(trojaned_digits.model, frr=0.05).fit(calibration)
    flags, used = scale_up.screen(mixed)
    assert torch.equal(flags, scale_up.score(mixed) > scale_up.threshold_)
    assert float(used.double().mean()) < len(scale_up.scales)  # some inputs were decided early
    teco = TeCo(trojaned_digits.model, frr=0.05).fit(calibration)
    flags, used = teco.screen(mixed)
    assert torch.equal(flags, teco.score(mixed) > teco.threshold_) and (used == teco.n_views).all()


def test_scores_do_not_depend_on_batching_or_position(trojaned_digits, inputs):
    calibration, benign, _ = inputs
    one = TeCo(trojaned_digits.model, frr=0.05, batch_size=4096).fit(calibration[:60])
    tiny = TeCo(trojaned_digits.model, frr=0.05, batch_size=1).fit(calibration[:60])
    torch.testing.assert_close(tiny.score(benign[:20]), one.score(benign[:20]))
    torch.testing.assert_close(one.score(benign[:20].flip(0)), one.score(benign[:20]).flip(0))
    assert one.threshold_ == pytest.approx(tiny.threshold_)


# --- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["teco", "scale-up", "guard"])
def test_files_round_trip_and_refuse_another_model(kind, guard, trojaned_digits, inputs, tmp_path):
    model = trojaned_digits.model
    saved = guard if kind == "guard" else guard.members[kind].detector
    cls = type(saved)
    saved.save(tmp_path / "g.npz")
    loaded = cls.load(tmp_path / "g.npz", model)
    mixed = torch.cat([inputs[1][:40], inputs[2][:40]])
    assert torch.equal(loaded.detect(mixed), saved.detect(mixed))
    assert loaded.options() == saved.options()
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(TrojanscanError, match="different model") as bad:
        cls.load(tmp_path / "g.npz", other)
    _one_line(bad)


def test_damaged_or_foreign_files_are_one_line_errors(guard, trojaned_digits, tmp_path):
    model = trojaned_digits.model
    guard.save(tmp_path / "guard.npz")
    guard.members["teco"].detector.save(tmp_path / "teco.npz")
    with pytest.raises(TrojanscanError, match="not a TeCo calibration") as bad:
        TeCo.load(tmp_path / "guard.npz", model)
    _one_line(bad)
    with pytest.raises(TrojanscanError, match="not a SCALE-UP calibration") as bad:
        ScaleUp.load(tmp_path / "teco.npz", model)
    _one_line(bad)
    fields = load_npz_record(tmp_path / "teco.npz", "TeCo calibration")
    np.savez(tmp_path / "edited.npz", **{**fields, "threshold": np.array(-1.0)})  # by hand: no checksum
    with pytest.raises(TrojanscanError, match="edited.npz") as bad:
        TeCo.load(tmp_path / "edited.npz", model)
    _one_line(bad)
    # damaged fields under a valid checksum reach the detectors' own checks
    for key, value in (("precision", np.zeros(3)), ("reference", fields["reference"][::-1]),
                       ("severity", np.array(9)), ("threshold", np.array(math.nan))):
        save_npz_record(tmp_path / "bad.npz", {**fields, key: value})
        with pytest.raises(TrojanscanError, match="bad.npz") as bad:
            TeCo.load(tmp_path / "bad.npz", model)
        _one_line(bad)
    fields = load_npz_record(tmp_path / "guard.npz", "guard calibration")
    save_npz_record(tmp_path / "bad.npz", {**fields, "strip.n": np.array(0)})
    with pytest.raises(TrojanscanError, match="bad.npz: its STRIP part") as bad:
        Guard.load(tmp_path / "bad.npz", model)
    _one_line(bad)
    save_npz_record(tmp_path / "bad.npz", {**fields, "calibration.teco": fields["calibration.teco"][:-30]})
    with pytest.raises(TrojanscanError, match="bad.npz") as bad:
        Guard.load(tmp_path / "bad.npz", model)
    _one_line(bad)


# --- clear errors ---------------------------------------------------------------------------------


def test_bad_input_gets_one_line_errors(guard, trojaned_digits, inputs):
    model, (calibration, benign, _) = trojaned_digits.model, inputs
    for make in (lambda: TeCo(model, severity=0), lambda: TeCo(model, corruptions=("fog", "contrast")),
                 lambda: TeCo(model, corruptions=("contrast",)), lambda: TeCo(model, deviation="max"),
                 lambda: ScaleUp(model, scales=(0.5, 3)), lambda: ScaleUp(model, scales=()),
                 lambda: Guard(model, detectors=("teco", "teco")), lambda: Guard(model, detectors="strip,nc"),
                 lambda: Guard(model, frr=0.0), lambda: TeCo("model.pt"),
                 lambda: TeCo(model).detect(benign), lambda: Guard(model).detect(benign),
                 lambda: TeCo(model).fit(calibration[:5]), lambda: Guard(model).fit(calibration * 2),
                 lambda: guard.detect(torch.rand(3, 1, 8, 8)),
                 lambda: guard.detect(torch.full((2, 1, 16, 16), math.nan))):
        with pytest.raises(TrojanscanError) as bad:
            make()
        _one_line(bad)


# --- the command line -----------------------------------------------------------------------------


def test_guard_calibrate_check_and_evaluate(trojaned_digits, digits, tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    trojaned_digits.trigger.save(trigger_path_for(model))
    cal = tmp_path / "guard.npz"
    r = runner.invoke(app, ["guard", "calibrate", str(model), "--data", "digits", "--samples", "300",
                            "--frr", "0.05", "--detectors", "strip,teco", "--option", "severity=2",
                            "--out", str(cal)])
    assert r.exit_code == 0, r.output
    assert "strip + teco" in r.stdout and cal.is_file()
    x = digits.x_test[digits.y_test != 0][:30]
    images = torch.cat([x, trojaned_digits.trigger.apply(x)])
    np.savez(tmp_path / "inputs.npz", x=(images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    r = runner.invoke(app, ["guard", "check", str(model), "--calibration", str(cal), "--inputs",
                            str(tmp_path / "inputs.npz"), "--json", str(tmp_path / "check.json")])
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "check.json").read_text())
    flagged = [row["trojaned"] for row in check["results"]]
    assert sum(flagged[30:]) >= 27 and sum(flagged[:30]) <= 3, flagged
    assert check["detectors"] == ["strip", "teco"] and {"strip", "teco"} >= {
        row["flagged_by"] for row in check["results"] if row["trojaned"]}
    r = runner.invoke(app, ["guard", "evaluate", str(model), "--data", "digits", "--samples", "150", "--frr",
                            "0.05", "--out", str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert list(ev)[:2] == ["far", "frr"] and ev["far"] < 0.1 and ev["frr"] < 0.15, ev
    assert set(ev["detectors"]) == {"teco", "strip", "layer-knn"} and ev["throughput"]["cost_benign"] > 1
    assert "Combined guard evaluation" in (tmp_path / "ev" / "report.html").read_text()
    for args, needle in ((["check", str(model), "--calibration", str(tmp_path / "inputs.npz"), "--inputs",
                           str(tmp_path / "inputs.npz")], "not a guard calibration"),
                         (["calibrate", str(model), "--data", "digits", "--out", str(cal), "--detectors",
                           "strip,nc"], "unknown detector"),
                         (["calibrate", str(model), "--data", "digits", "--out", str(cal), "--option",
                           "colour=red"], "no option 'colour'"),
                         (["evaluate", str(model), "--data", "digits", "--calibrate-on", "val"],
                          "calibration split")):
        r = runner.invoke(app, ["guard", *args])
        assert r.exit_code == 2 and needle in r.output, (args, r.output)


def test_evaluation_draws_stamp_a_two_target_trigger_one_part_each(digits):
    from trojanscan.attacks import TwoTarget
    from trojanscan.workflows.guarding import evaluation_inputs, stamped_labels

    trigger = TwoTarget(target=2, second_target=5, size=3, seed=1).make_trigger(digits.input_shape)
    _, stamped = evaluation_inputs(digits, trigger, 40, seed=0)
    y = stamped_labels(digits, trigger, 40, seed=0)
    assert len(stamped) == len(y) == 40 and not torch.isin(y, torch.tensor([2, 5])).any()
    first, second = trigger.parts()
    assert (stamped[0::2][:, :, first.mask > 0] == 1).all()  # white patches, one part each
    assert (stamped[1::2][:, :, second.mask > 0] == 1).all()
    # each stamped image is a test image of the label stamped_labels gives, outside the patches
    free = trigger.mask == 0
    for image, label in zip(stamped[:6], y[:6], strict=True):
        same = (digits.x_test[:, :, free] == image[:, free]).flatten(1).all(1)
        assert same.any() and set(digits.y_test[same].tolist()) == {int(label)}
    assert trigger.intended_in_turn(y)[:4].tolist() == [2, 5, 2, 5]
