"""Mitigation on a tiny planted-backdoor digits model: input filter, pruning, unlearning, `repair`."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from trojanscan import TrojanscanError, load_model, save_model, scan
from trojanscan.api import repair, reversed_triggers
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.pruning import prune
from trojanscan.defenses.unlearning import unlearn
from trojanscan.models.taps import activations, find_layer, prune_weights, rank_neurons, silenced
from trojanscan.train import evaluate


def load_model_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


@pytest.fixture(scope="module")
def scanned(trojaned_digits, digits, tmp_path_factory):
    """The trojaned model saved with its trigger, and a Neural Cleanse scan folder of it."""
    root = tmp_path_factory.mktemp("mitigation")
    model_path = root / "badnets.safetensors"
    save_model(trojaned_digits.model, model_path)
    trojaned_digits.trigger.save(root / "badnets.trigger.npz")
    out = root / "scan"
    result = scan(model_path, digits, clean_samples=300, steps=60, seed=0, out_dir=out, progress=False)
    assert result.flagged_labels == [0], "the planted backdoor must be found for these tests to mean much"
    return model_path, out, result


def test_find_layer_defaults_to_the_input_of_the_last_linear(trojaned_digits):
    layer = find_layer(trojaned_digits.model)
    assert layer.name == "classifier" and layer.side == "input"
    assert find_layer(trojaned_digits.model, "features.3").side == "output"
    with pytest.raises(TrojanscanError, match="no layer 'nope'.*features"):
        find_layer(trojaned_digits.model, "nope")
    with pytest.raises(TrojanscanError, match="TorchScript"):
        find_layer(torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))))


def test_rank_neurons_orders_by_trigger_gap():
    clean = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]])
    stamped = torch.tensor([[1.0, 5.0, 3.0], [1.0, 3.0, 3.0]])
    order, gap = rank_neurons(clean, stamped)
    assert order.tolist() == [1, 2, 0]
    assert torch.allclose(gap, torch.tensor([0.0, 4.0, 1.0]))


@pytest.mark.parametrize("layer", [None, "features.3"])
def test_pruned_weights_equal_silenced_neurons(trojaned_digits, digits, layer):
    model = trojaned_digits.model
    twin = load_model_copy(model)
    where, where_copy = find_layer(model, layer), find_layer(twin, layer)
    neurons = torch.tensor([0, 3, 7])
    with torch.no_grad(), silenced(where, neurons):
        expected = model(digits.x_test[:64])
    prune_weights(where_copy, neurons)
    with torch.no_grad():
        assert torch.allclose(twin(digits.x_test[:64]), expected, atol=1e-5)
    if where.side == "input":  # the last Linear ignores them
        assert where_copy.module.weight[:, neurons].abs().max() == 0
    else:  # the named layer outputs zero for them
        assert activations(twin, where_copy, digits.x_test[:16])[:, neurons].abs().max() == 0


def test_filter_rejects_stamped_inputs_at_about_the_requested_fpr(trojaned_digits, digits):
    trig = trojaned_digits.trigger
    filt = InputFilter(trojaned_digits.model, fpr=0.1, top_fraction=0.02).fit(digits.x_train, [trig])
    assert len(filt.neurons_) == round(0.02 * 512)
    fpr = float(filt.detect(digits.x_test).float().mean())
    assert 0.03 <= fpr <= 0.2, fpr  # 10% asked; 360 test images
    others = digits.x_test[digits.y_test != trig.target]
    fnr = float((~filt.detect(trig.apply(others))).float().mean())
    assert fnr < 0.1, fnr
    labels, flags = filt.predict(digits.x_test[:10])
    assert labels.shape == flags.shape == (10,)


def test_filter_saves_and_refuses_other_models_and_junk(trojaned_digits, digits, tmp_path):
    filt = InputFilter(trojaned_digits.model).fit(digits.x_train[:200], [trojaned_digits.trigger])
    filt.save(tmp_path / "f.npz")
    again = InputFilter.load(tmp_path / "f.npz", trojaned_digits.model)
    assert torch.equal(again.detect(digits.x_test), filt.detect(digits.x_test))
    other = load_model_copy(trojaned_digits.model)
    with torch.no_grad():
        other.classifier.bias += 1
    with pytest.raises(TrojanscanError, match="different model"):
        InputFilter.load(tmp_path / "f.npz", other)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TrojanscanError, match="not an input-filter file"):
        InputFilter.load(tmp_path / "junk.npz", trojaned_digits.model)
    with pytest.raises(TrojanscanError, match="at least 20"):
        InputFilter(trojaned_digits.model).fit(digits.x_train[:5], [trojaned_digits.trigger])


def test_pruning_kills_the_trigger_and_keeps_most_accuracy(trojaned_digits, digits):
    model, trig = trojaned_digits.model, trojaned_digits.trigger
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, digits.x_train[:600], digits.y_train[:600], [trig], asr_threshold=0.05,
                   step=0.02)
    assert result.reached and 0 < len(result.pruned) < result.units
    assert result.curve[0]["reversed_asr"] > 0.9 and result.curve[-1]["reversed_asr"] < 0.05
    assert [c["pruned"] for c in result.curve] == sorted(c["pruned"] for c in result.curve)
    scores = evaluate(result.model, digits.x_test, digits.y_test, trig)
    assert scores["attack_success_rate"] < 0.2
    assert scores["clean_accuracy"] > trojaned_digits.clean_accuracy - 0.15
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "original changed"


def test_unlearning_removes_the_backdoor(trojaned_digits, digits):
    model, trig = trojaned_digits.model, trojaned_digits.trigger
    done = unlearn(model, digits.x_train, digits.y_train, [trig], fraction=0.5, epochs=3, seed=0)
    assert done.stamped == round(0.2 * done.images)
    scores = evaluate(done.model, digits.x_test, digits.y_test, trig)
    assert trojaned_digits.attack_success_rate > 0.9
    assert scores["attack_success_rate"] < 0.15
    assert scores["clean_accuracy"] > trojaned_digits.clean_accuracy - 0.05
    with pytest.raises(TrojanscanError, match="fraction"):
        unlearn(model, digits.x_train, digits.y_train, [trig], fraction=0)


def test_repair_api_writes_model_record_and_report(scanned, digits, tmp_path):
    model_path, scan_dir, _ = scanned
    record = repair(model_path, scan_dir, digits, method="unlearn", fraction=0.5, epochs=3,
                    out=tmp_path / "fixed.safetensors", progress=False)
    assert record["labels"] == [0]
    assert record["before"]["real_asr"] > 0.9 and record["after"]["real_asr"] < 0.2
    assert record["after"]["reversed_asr"] < record["before"]["reversed_asr"]
    fixed = load_model(tmp_path / "fixed.safetensors").module
    assert evaluate(fixed, digits.x_test, digits.y_test)["clean_accuracy"] == pytest.approx(
        record["after"]["clean_accuracy"])
    saved = json.loads((scan_dir / "mitigation.json").read_text())
    assert saved["unlearn"]["after"] == record["after"]
    assert "Mitigation" in (scan_dir / "report.html").read_text()
    # rerunning the same scan into its folder (a resume) keeps the repairs on the page
    scan(model_path, digits, clean_samples=300, steps=60, seed=0, out_dir=scan_dir, progress=False)
    assert "Mitigation" in (scan_dir / "report.html").read_text()


def test_nothing_flagged_is_a_clear_error(scanned, digits):
    _, _, result = scanned
    clean_verdict = dataclasses.replace(result, flagged_labels=[], infected=False)
    with pytest.raises(TrojanscanError, match="flagged no label.*--label"):
        repair(scanned[0], clean_verdict, digits, method="prune", progress=False)
    _, triggers = reversed_triggers(clean_verdict, labels=[3])
    assert [t.target for t in triggers] == [3]
    with pytest.raises(TrojanscanError, match="unknown repair method"):
        repair(scanned[0], result, digits, method="retrain")


def test_cli_filter_and_prune_and_one_line_errors(scanned, tmp_path):
    model_path, scan_dir, _ = scanned
    run = [sys.executable, "-m", "trojanscan.cli"]
    done = subprocess.run([*run, "filter", str(model_path), "--scan", str(scan_dir), "--data", "digits",
                           "--out", str(tmp_path / "f.npz"), "--json", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rec = json.loads((tmp_path / "f.json").read_text())
    assert rec["filter"]["fnr_real"] is not None and (tmp_path / "f.npz").is_file()
    done = subprocess.run([*run, "filter-check", str(model_path), "--filter", str(tmp_path / "f.npz"),
                           "--inputs", "digits", "--json", str(tmp_path / "c.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    checked = json.loads((tmp_path / "c.json").read_text())
    assert checked["count"] == 360 and 0 < checked["rejected"] < 60  # ~5% of clean test images
    done = subprocess.run([*run, "repair", str(model_path), "--scan", str(scan_dir), "--data", "digits",
                           "--method", "prune", "--out", str(tmp_path / "p.safetensors"), "--json",
                           str(tmp_path / "p.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["pruning"]["curve"][0]["pruned"] == 0 and rec["after"]["reversed_asr"] < 0.2
    other = tmp_path / "other.safetensors"
    save_model(load_model(tmp_path / "p.safetensors").module, other)
    for args, message in [(["--scan", str(tmp_path)], "no such scan result"),
                          (["--scan", str(scan_dir), "--method", "retrain"], "unknown repair method")]:
        bad = subprocess.run([*run, "repair", str(model_path), "--data", "digits", "--out",
                              str(tmp_path / "x.safetensors"), *args], capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([*run, "repair", str(other), "--scan", str(scan_dir), "--data", "digits", "--out",
                          str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "different model" in bad.stderr


def test_a_repeated_scan_folder_points_to_its_runs(tmp_path):
    from trojanscan.defenses.scan_result import ScanResult

    (tmp_path / "seed-3").mkdir()
    (tmp_path / "seed-3" / "scan.json").write_text("{}")
    with pytest.raises(TrojanscanError, match=r"repeated scan \(seed-3\); pass one run's folder"):
        ScanResult.load(tmp_path)
