"""Neural Cleanse on a planted backdoor: batched equals sequential, detection, resume, errors."""

from __future__ import annotations

import pytest
import torch

from trojanscan import TrojanscanError, build_model
from trojanscan.defenses import scan as scan_module
from trojanscan.defenses.neural_cleanse import NeuralCleanse
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.trigger_search import SearchSchedule, search_triggers

# a small budget: enough for the digits backdoor, a few seconds per scan on 2 cores
QUICK = SearchSchedule(steps=60, mini_batches=2, batch_size=32, patience=2, early_stop_patience=6)


@pytest.fixture(scope="module")
def clean_subset(digits):
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(digits.x_test), generator=g)[:300]
    return digits.x_test[idx], digits.y_test[idx]


def test_batched_search_equals_one_label_at_a_time(trojaned_digits, clean_subset):
    x, _ = clean_subset
    schedule = SearchSchedule(steps=12, mini_batches=2, batch_size=16, patience=2,
                              early_stop_patience=3)
    model = trojaned_digits.model
    batched = search_triggers(model, x, [0, 3, 7], schedule, chunk=3, seed=4)
    single = [search_triggers(model, x, [v], schedule, chunk=1, seed=4)[0] for v in (0, 3, 7)]
    for b, s in zip(batched, single, strict=True):
        assert b.label == s.label and b.steps == s.steps
        assert torch.allclose(b.mask, s.mask, atol=1e-4), (b.label, (b.mask - s.mask).abs().max())
        assert torch.allclose(b.pattern, s.pattern, atol=1e-4)
        assert b.l1_norm == pytest.approx(s.l1_norm, rel=1e-4)


def test_search_leaves_model_weights_and_mode_untouched(trojaned_digits, clean_subset):
    model = trojaned_digits.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search_triggers(model, clean_subset[0], [1], SearchSchedule(steps=2, mini_batches=1),
                    chunk=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_planted_backdoor_is_flagged_with_its_target(trojaned_digits, clean_subset, tmp_path):
    x, y = clean_subset
    result = NeuralCleanse(QUICK, progress=False).scan(trojaned_digits.model, x, y,
                                                       num_classes=10, out_dir=tmp_path)
    assert result.infected and 0 in result.flagged_labels
    assert result.anomaly_index > 2
    reversed_trigger = result.label(0)
    # kept from a step whose ASR reached the threshold; re-measured on all clean images after
    assert reversed_trigger.converged and reversed_trigger.extra["step_attack_success_rate"] >= 0.99
    assert reversed_trigger.attack_success_rate > 0.95
    assert reversed_trigger.l1_norm < result.median_l1
    assert result.image_passes == sum(r.image_passes for r in result.labels) > 0
    back = ScanResult.load(tmp_path / "scan.json")
    assert back.flagged_labels == result.flagged_labels
    assert torch.equal(back.label(0).mask, reversed_trigger.mask)


class BatchSizeRounding(torch.nn.Module):
    """The model, with CPU kernels' habit made visible: a row's logits change in the 6th digit with
    the size of the batch it runs in (oneDNN/MKL block differently; on our MNIST CNN a row computed
    in a batch of 32-96 differs from the same row in a batch of 320 by up to 7e-8)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + 1e-6 * (len(x) % 7) * torch.linspace(0, 1, out.shape[1])


@pytest.mark.parametrize("kill_after", [1, 5, 10, "during-write"])
def test_interrupted_scan_resumes_to_the_identical_result(trojaned_digits, clean_subset, tmp_path,
                                                          monkeypatch, kill_after):
    """Killed after k labels, during a label's write or after the last label (before scan.json),
    the rerun reuses what was saved and reports exactly what one uninterrupted run reports."""
    x, y = clean_subset
    model = BatchSizeRounding(trojaned_digits.model).eval()
    nc = NeuralCleanse(QUICK, chunk=4, progress=False)
    full = nc.scan(model, x, y, num_classes=10)

    saved = []
    real_save = scan_module.save_label

    def save_then_crash(out_dir, result, fingerprint):
        if kill_after == "during-write":  # the third label's temporary file is left half-written
            if len(saved) == 2:
                (out_dir / "labels" / f".label_{result.label:03d}.npz.x1.tmp").write_bytes(b"PK\x03")
                raise KeyboardInterrupt
        real_save(out_dir, result, fingerprint)
        saved.append(result.label)
        if len(saved) == kill_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "save_label", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        nc.scan(model, x, y, num_classes=10, out_dir=tmp_path)
    assert not (tmp_path / "scan.json").exists()
    monkeypatch.setattr(scan_module, "save_label", real_save)
    searched = []
    real_search = scan_module.search_triggers

    def spy(model, x_clean, labels, *args, **kwargs):
        searched.extend(v for v in labels if v not in kwargs.get("replay", {}))
        return real_search(model, x_clean, labels, *args, **kwargs)

    monkeypatch.setattr(scan_module, "search_triggers", spy)
    resumed = nc.scan(model, x, y, num_classes=10, out_dir=tmp_path)
    assert sorted(searched) == sorted(set(range(10)) - set(saved)), "finished labels are reused"
    assert resumed.to_dict(timings=False) == full.to_dict(timings=False)
    for a, b in zip(resumed.labels, full.labels, strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    assert ScanResult.load(tmp_path).to_dict(timings=False) == full.to_dict(timings=False)


def test_other_settings_do_not_reuse_saved_labels(trojaned_digits, clean_subset, tmp_path):
    x, y = clean_subset
    tiny = SearchSchedule(steps=2, mini_batches=1)
    NeuralCleanse(tiny, progress=False).scan(trojaned_digits.model, x, y, num_classes=10,
                                             labels=[0, 1, 2], out_dir=tmp_path)
    other = NeuralCleanse(tiny, seed=1, progress=False).scan(
        trojaned_digits.model, x, y, num_classes=10, labels=[0, 1, 2], out_dir=tmp_path)
    assert other.seed == 1 and all(r.steps == 2 for r in other.labels)


def test_clear_errors_for_unusable_inputs(trojaned_digits, clean_subset, digits):
    x, y = clean_subset
    nc = NeuralCleanse(QUICK, progress=False)
    with pytest.raises(TrojanscanError, match="the data has 12 classes"):
        nc.scan(trojaned_digits.model, x, y, num_classes=10 + 2)
    with pytest.raises(TrojanscanError, match="cannot run on images"):
        nc.scan(trojaned_digits.model, torch.rand(50, 3, 32, 32), None, num_classes=10)
    with pytest.raises(TrojanscanError, match="at least 20 clean images"):
        nc.scan(trojaned_digits.model, x[:5], y[:5], num_classes=10)
    with pytest.raises(TrojanscanError, match="N×C×H×W"):
        nc.scan(trojaned_digits.model, x[0], None, num_classes=10)
    untrained = build_model("mnist-cnn", 10, digits.input_shape)
    torch.nn.init.zeros_(untrained.classifier.weight)
    with pytest.raises(TrojanscanError, match="near chance"):
        nc.scan(untrained, x, y, num_classes=10)


def test_schedule_bookkeeping_follows_the_authors_rules():
    from trojanscan.defenses.trigger_search import _LabelState

    s = SearchSchedule(patience=2, init_cost=1e-3, early_stop_patience=3, asr_threshold=0.99)
    st = _LabelState(5, s)
    mask, pattern = torch.zeros(4, 4), torch.zeros(1, 4, 4)

    def step(asr, l1):
        st.end_step(asr, l1, 0.0, mask + l1, pattern)

    step(1.0, 10)
    assert st.cost == 0, "λ starts at 0"
    step(1.0, 9)
    assert st.cost == 1e-3 and not st.up_flag, "switched on after `patience` successful steps"
    step(1.0, 8)
    assert st.cost == 2e-3 and st.up_flag
    step(0.5, 5)  # below the threshold: never kept as the best, however small
    step(0.5, 5)
    assert st.cost == pytest.approx(2e-3 / 2 ** 1.5) and st.down_flag
    assert st.best_l1 == 8 and st.best_asr == 1.0 and float(st.best_mask[0, 0]) == 8
    assert not st.done and st.early_counter == 2
    step(0.5, 5)  # third step without improvement, λ has gone up and down → stop
    assert st.done and st.stop_reason == "early-stop" and st.steps == 6


def test_labels_that_stop_early_leave_the_batch_without_changing_the_others(trojaned_digits,
                                                                            clean_subset):
    x, _ = clean_subset
    schedule = SearchSchedule(steps=40, mini_batches=1, batch_size=16, patience=1,
                              early_stop_patience=2)
    model = trojaned_digits.model
    batched = search_triggers(model, x, [0, 1, 2, 3], schedule, chunk=4, seed=2)
    assert len({r.steps for r in batched}) > 1, "labels must stop at different steps here"
    for b in batched:
        s = search_triggers(model, x, [b.label], schedule, chunk=1, seed=2)[0]
        assert b.steps == s.steps and torch.allclose(b.mask, s.mask, atol=1e-4)


def test_normalised_third_party_model_is_scanned_in_pixel_space(trojaned_digits, clean_subset):
    from trojanscan.models.wrappers import wrap_normalization

    class ExpectsNormalised(torch.nn.Module):
        """A foreign model: takes (x - 0.5) / 0.25, has no normalisation of its own."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z * 0.25 + 0.5)

    x, y = clean_subset
    foreign = ExpectsNormalised(trojaned_digits.model).eval()
    wrapped, convention = wrap_normalization(foreign, [0.5], [0.25], channels=1)
    assert "(x - [0.5]) / [0.25]" in convention
    assert torch.allclose(wrapped(x[:8]), trojaned_digits.model(x[:8]), atol=1e-5)
    result = NeuralCleanse(QUICK, progress=False).scan(wrapped, x, y, num_classes=10, labels=[0, 1, 2])
    assert result.label(0).l1_norm < min(result.label(1).l1_norm, result.label(2).l1_norm)


def test_probing_a_model_does_not_touch_its_batch_norm_statistics():
    from trojanscan.validation import check_model_fits

    model = build_model("gtsrb-cnn", 43, (3, 32, 32)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model_fits(model, (3, 32, 32), 43)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
