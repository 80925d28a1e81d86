"""STRIP: entropy maths, the FRR boundary, detection of a planted backdoor, batching and saved files."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from trojanscan.defenses.strip import (
    TEMPERATURE_GRID,
    Strip,
    detection_boundary,
    normalized_entropy,
    parse_temperature,
    pick_temperature,
    skewness,
)
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import CHECKSUM_MEMBER, save_npz_record
from trojanscan.metrics import far_frr

# --- entropy maths --------------------------------------------------------------------------------


def test_normalized_entropy_of_known_distributions():
    uniform = torch.full((1, 4), 0.25)  # one input, N=1 copy, K=4 classes
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert normalized_entropy(uniform).item() == pytest.approx(2.0)
    assert normalized_entropy(one_hot).item() == 0.0  # 0·log 0 counts as 0, not NaN
    # N copies are averaged: half uniform (2 bits), half one-hot (0 bits) → 1 bit
    mixture = torch.stack([torch.cat([uniform, one_hot]), torch.cat([one_hot, one_hot])])  # 2×N=2×K=4
    assert normalized_entropy(mixture).tolist() == pytest.approx([1.0, 0.0])


def test_normal_boundary_matches_the_requested_frr():
    gen = torch.Generator().manual_seed(0)
    benign = 1.0 + 0.2 * torch.randn(20000, generator=gen)
    boundary = detection_boundary(benign, frr=0.01, method="normal")
    assert boundary == pytest.approx(0.5347, abs=0.01)  # 1.0 + 0.2·Φ⁻¹(0.01)
    fresh = 1.0 + 0.2 * torch.randn(20000, generator=gen)
    assert float((fresh < boundary).float().mean()) == pytest.approx(0.01, abs=0.003)
    assert detection_boundary(benign, 0.01, "quantile") == pytest.approx(boundary, abs=0.02)
    with pytest.raises(TrojanscanError, match="frr"):
        detection_boundary(benign, frr=1.5)


def test_far_frr_counts_the_right_mistakes():
    rates = far_frr(torch.tensor([True, False, False, False]), torch.tensor([True, True, False]))
    assert rates["frr"] == pytest.approx(0.25)  # one benign flagged
    assert rates["far"] == pytest.approx(1 / 3)  # one trojaned missed


def test_skewness_and_temperature_choice():
    gen = torch.Generator().manual_seed(0)
    symmetric = torch.randn(20000, generator=gen)
    piled_at_zero = torch.randn(20000, generator=gen).pow(2)  # chi-square(1): skewness √8 ≈ 2.83
    assert skewness(symmetric) == pytest.approx(0.0, abs=0.1)
    assert skewness(piled_at_zero) == pytest.approx(math.sqrt(8), rel=0.15)
    assert math.isnan(skewness(torch.ones(5)))
    assert pick_temperature({1.0: piled_at_zero, 4.0: symmetric, 8.0: -piled_at_zero}) == 4.0
    assert pick_temperature({2.0: torch.ones(5), 3.0: torch.ones(5)}) == 2.0  # all constant
    assert parse_temperature("auto") == "auto" and parse_temperature("2.5") == 2.5
    for bad in (0, -1.0, math.inf, "hot", True):
        with pytest.raises(TrojanscanError, match="temperature"):
            parse_temperature(bad)


# --- the planted backdoor -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(trojaned_digits, digits):
    """STRIP with N=20 calibrated on the first 150 clean digits test images."""
    return Strip(trojaned_digits.model, n=20).calibrate(digits.x_test[:150])


def test_strip_flags_stamped_inputs_and_passes_clean_ones(calibrated, trojaned_digits, digits):
    x, y = digits.x_test[150:], digits.y_test[150:]
    stamped = trojaned_digits.trigger.apply(x[y != 0])
    rates = far_frr(calibrated.detect(x), calibrated.detect(stamped))
    # measured: FRR ≈ 4%, FAR ≈ 0.5% (210 clean, 187 stamped)
    assert rates["far"] < 0.10
    assert rates["frr"] < 0.10
    assert calibrated.entropy(stamped).mean() < calibrated.entropy(x).mean() / 2
    labels, flags = calibrated.predict(stamped)
    assert float((labels == 0).float().mean()) > 0.8 and flags.dtype == torch.bool


def test_batched_entropy_equals_unbatched(trojaned_digits, digits):
    x, pool = digits.x_test[:12], digits.x_test[100:140]
    one_call = Strip(trojaned_digits.model, n=7, batch_size=4096, seed=3).calibrate(pool)
    tiny = Strip(trojaned_digits.model, n=7, batch_size=1, seed=3).calibrate(pool)
    torch.testing.assert_close(tiny.entropy(x), one_call.entropy(x), atol=1e-5, rtol=1e-5)
    assert one_call.boundary_ == pytest.approx(tiny.boundary_, abs=1e-5)


def test_accelerated_copies_match_the_eager_model_and_follow_its_weights(trojaned_digits, digits):
    model = copy.deepcopy(trojaned_digits.model)
    pool, x = digits.x_test[:60], digits.x_test[60:100]
    fast = Strip(model, n=10, boundary="quantile").calibrate(pool)
    eager = Strip(model, n=10, boundary="quantile", accelerate=False).calibrate(pool)
    assert fast.accelerated and not eager.accelerated
    torch.testing.assert_close(fast.entropy(x), eager.entropy(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.predict(x)[0], eager.predict(x)[0])
    with torch.no_grad():  # weights changed behind autograd's back: the frozen copy must be rebuilt
        model.features[0].weight.data.mul_(-1.0)
    torch.testing.assert_close(fast.entropy(x), eager.entropy(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.predict(x)[0], eager.predict(x)[0])
    assert isinstance(fast._runner._fast[1], torch.jit.ScriptModule)  # which pickle cannot take: left out
    torch.testing.assert_close(pickle.loads(pickle.dumps(fast)).entropy(x), eager.entropy(x),
                               atol=1e-5, rtol=1e-5)
    model.classifier.register_forward_hook(_uniform)
    uniform = [math.log2(10)] * len(x)
    assert fast.entropy(x).tolist() == pytest.approx(uniform)
    assert not fast.accelerated  # a hooked model runs eagerly, hook included


class _Scaled(torch.nn.Module):
    """A linear classifier whose logits are multiplied by a plain attribute."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features, 10)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * self.scale


def test_a_frozen_scripted_model_follows_its_attributes(digits):
    torch.manual_seed(0)
    model = torch.jit.script(_Scaled(digits.x_test[0].numel()))
    pool, x = digits.x_test[:60], digits.x_test[60:80]
    fast = Strip(model, n=5, boundary="quantile").calibrate(pool)
    before = fast.entropy(x)
    assert fast.accelerated
    model.scale = 5.0  # invisible to the fingerprint; the copy's spot check must notice
    eager = Strip(model, n=5, boundary="quantile", accelerate=False).calibrate(pool)
    torch.testing.assert_close(fast.entropy(x), eager.entropy(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast.entropy(x), before, atol=1e-3)
    model.train()
    fast.entropy(x)
    assert model.training  # the caller's mode is restored


def _uniform(module, inputs, logits):
    """A forward hook that makes every prediction uniform."""
    return torch.zeros_like(logits)


def test_temperature_divides_the_logits(trojaned_digits, digits):
    pool, x = digits.x_test[:60], digits.x_test[60:70]
    hot = Strip(trojaned_digits.model, n=5, temperature=4.0).calibrate(pool)
    cold = Strip(trojaned_digits.model, n=5, boundary="quantile").calibrate(pool)
    logits = []
    with cold._classifying() as classify:
        for _, chunk in cold._copy_logits(classify, x, cold._overlay_indices(len(x))):
            logits.append(chunk)
    by_hand = normalized_entropy(torch.softmax(torch.cat(logits) / 4.0, -1))
    torch.testing.assert_close(hot.entropy(x), by_hand, atol=1e-5, rtol=1e-5)
    assert (hot.entropy(x) > cold.entropy(x)).all()  # a hotter softmax is flatter


def test_auto_temperature_is_picked_from_the_grid_and_saved(trojaned_digits, digits, tmp_path):
    auto = Strip(trojaned_digits.model, n=10, temperature="auto").calibrate(digits.x_test[:150])
    assert auto.temperature_ in TEMPERATURE_GRID
    fixed = Strip(trojaned_digits.model, n=10, temperature=auto.temperature_).calibrate(
        digits.x_test[:150])
    assert fixed.boundary_ == pytest.approx(auto.boundary_, abs=1e-6)
    auto.save(tmp_path / "auto.npz")
    loaded = Strip.load(tmp_path / "auto.npz", trojaned_digits.model)
    assert loaded.temperature == "auto" and loaded.temperature_ == auto.temperature_
    x = digits.x_test[150:190]
    torch.testing.assert_close(loaded.entropy(x), auto.entropy(x))


def test_screening_gives_the_full_verdict_with_fewer_copies(calibrated, trojaned_digits, digits):
    x, y = digits.x_test[150:], digits.y_test[150:]
    mixed = torch.cat([x, trojaned_digits.trigger.apply(x[y != 0])])
    flags, total, used = calibrated.screen(mixed)
    full = calibrated.entropy(mixed)
    assert torch.equal(flags, full < calibrated.boundary_)
    finished = used == calibrated.n
    torch.testing.assert_close(total[finished].float() / calibrated.n, full[finished], atol=1e-5,
                               rtol=1e-5)
    early_benign = ~finished & ~flags
    assert (total[early_benign] / calibrated.n >= calibrated.boundary_).all()
    assert used[: len(x)].float().mean() < calibrated.n / 2  # clean inputs mostly stop early
    assert torch.equal(calibrated.screen(mixed, rounds=1)[0], flags)


def _rewrite(src, dst, *, reseal: bool, drop=(), **changes):
    """A saved calibration with some members changed: resealed (a new checksum, as a careful forger
    or an old version would leave it) or with the original checksum kept (an edit)."""
    with np.load(src) as z:
        fields = {k: z[k] for k in z.files if k not in drop}
    fields.update({k: np.asarray(v) for k, v in changes.items()})
    if reseal:
        fields.pop(CHECKSUM_MEMBER)
        save_npz_record(dst, fields)
    else:
        np.savez(dst, **fields)


def test_version_1_files_load_with_temperature_1(calibrated, trojaned_digits, tmp_path):
    calibrated.save(tmp_path / "v2.npz")
    _rewrite(tmp_path / "v2.npz", tmp_path / "v1.npz", reseal=True,
             drop=("temperature", "temperature_request"), format_version=np.int64(1))
    old = Strip.load(tmp_path / "v1.npz", trojaned_digits.model)
    assert old.temperature_ == 1.0 and old.boundary_ == calibrated.boundary_


def test_an_edited_or_unsealed_calibration_is_refused(calibrated, trojaned_digits, tmp_path):
    """A boundary edited to accept every input is never used: the checksum no longer matches; a
    file without a checksum (hand-made, or from before checksums) is refused too."""
    calibrated.save(tmp_path / "good.npz")
    _rewrite(tmp_path / "good.npz", tmp_path / "edited.npz", reseal=False, boundary_value=np.float64(-5.0))
    with pytest.raises(TrojanscanError, match="does not match its checksum.*recalibrate"):
        Strip.load(tmp_path / "edited.npz", trojaned_digits.model)
    with np.load(tmp_path / "good.npz") as z:
        np.savez(tmp_path / "unsealed.npz", **{k: z[k] for k in z.files if k != CHECKSUM_MEMBER})
    with pytest.raises(TrojanscanError, match="without a checksum.*recalibrate"):
        Strip.load(tmp_path / "unsealed.npz", trojaned_digits.model)


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("temperature", np.zeros(3)),
                                          ("format_version", "x"), ("n", np.zeros(2)),
                                          ("boundary_value", "x"), ("temperature_request", "4.0")])
def test_damaged_fields_give_one_line_errors(calibrated, trojaned_digits, tmp_path, field, value):
    calibrated.save(tmp_path / "good.npz")
    _rewrite(tmp_path / "good.npz", tmp_path / "bad.npz", reseal=True, **{field: value})
    with pytest.raises(TrojanscanError, match="bad.npz"):
        Strip.load(tmp_path / "bad.npz", trojaned_digits.model)


def test_a_boundary_at_or_below_zero_is_warned_about(trojaned_digits, digits):
    # 5 copies on this confident model: entropies pile up near 0, and the normal fit's 1% point is < 0
    with pytest.warns(UserWarning, match="no input can be flagged"):
        strip = Strip(trojaned_digits.model, n=5).calibrate(digits.x_test[:60])
    assert strip.boundary_ <= 0 and not strip.detect(digits.x_test[60:80]).any()
    assert Strip(trojaned_digits.model, n=5, boundary="quantile").calibrate(
        digits.x_test[:60]).boundary_ > 0


def test_save_load_round_trip(calibrated, trojaned_digits, digits, tmp_path):
    path = tmp_path / "strip.npz"
    calibrated.save(path)
    loaded = Strip.load(path, trojaned_digits.model)
    x = torch.cat([digits.x_test[150:200], trojaned_digits.trigger.apply(digits.x_test[200:230])])
    assert torch.equal(loaded.detect(x), calibrated.detect(x))
    assert loaded.boundary_ == calibrated.boundary_ and loaded.n == 20
    assert loaded.calibration_sha256_ == calibrated.calibration_sha256_
    other = copy.deepcopy(trojaned_digits.model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(TrojanscanError, match="different model"):
        Strip.load(path, other)  # the boundary is meaningless for other weights


def test_load_refuses_foreign_files(trojaned_digits, tmp_path):
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("hello")
    with pytest.raises(TrojanscanError, match="not a STRIP calibration"):
        Strip.load(not_npz, trojaned_digits.model)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, overlays=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(TrojanscanError, match="not a STRIP calibration"):
        Strip.load(pickled, trojaned_digits.model)
    with pytest.raises(TrojanscanError, match="no such"):
        Strip.load(tmp_path / "missing.npz", trojaned_digits.model)


# --- clear errors ---------------------------------------------------------------------------------


def test_clear_errors(calibrated, trojaned_digits, digits):
    model = trojaned_digits.model
    with pytest.raises(TrojanscanError, match="at least 20"):
        Strip(model).calibrate(digits.x_test[:5])
    with pytest.raises(TrojanscanError, match="same size"):
        Strip(model).calibrate(digits.x_test[:30], overlay_pool=torch.rand(10, 1, 8, 8))
    with pytest.raises(TrojanscanError, match=r"\(1, 16, 16\)"):
        calibrated.detect(torch.rand(3, 1, 8, 8))
    with pytest.raises(TrojanscanError, match="NaN"):
        calibrated.detect(torch.full((2, 1, 16, 16), math.nan))
    with pytest.raises(TrojanscanError, match="not calibrated"):
        Strip(model).detect(digits.x_test[:3])
    with pytest.raises(TrojanscanError, match="frr"):
        Strip(model, frr=0.0)
    with pytest.raises(TrojanscanError, match="blend"):
        Strip(model, blend="mix")
