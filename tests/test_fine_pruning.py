"""Fine-Pruning: dormant channels first, the accuracy budget, pruned channels staying removed through
fine-tuning, and ``repair --method fine-prune`` without a scan."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trojanscan.cli import app
from trojanscan.defenses.fine_pruning import dormancy_order, fine_prune, last_conv_layer
from trojanscan.errors import TrojanscanError
from trojanscan.models import save_model
from trojanscan.train import evaluate
from trojanscan.workflows.repairing import repair


def _one_line(excinfo: pytest.ExceptionInfo) -> None:
    assert str(excinfo.value) and "\n" not in str(excinfo.value)


def test_dormant_channels_come_first_in_the_last_convolution():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 4, 2))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1).expand(3, 2, 1, 1))
        net[2].bias.zero_()
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    x = torch.rand(8, 1, 2, 2)
    layer = last_conv_layer(net, x)
    assert layer.name == "2" and layer.side == "output"
    assert dormancy_order(net, layer, x).tolist() == [1, 0, 2]  # channel 1 never passes its ReLU
    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert last_conv_layer(no_conv, x).side == "input"  # the penultimate layer instead


@pytest.fixture(scope="module")
def fine_pruned(trojaned_digits, digits):
    held_x, held_y = digits.x_train[:400], digits.y_train[:400]
    return fine_prune(trojaned_digits.model, held_x, held_y, digits.x_train, digits.y_train, step=0.05,
                      max_accuracy_drop=0.04, fraction=0.3, epochs=2, real_trigger=trojaned_digits.trigger)


def test_pruning_keeps_to_the_budget_and_the_channels_stay_removed(fine_pruned, trojaned_digits, digits):
    result = fine_pruned
    curve = result.curve
    assert result.layer == "features.3" and result.units == 32 and 0 < len(result.pruned) < 32
    assert all(p["clean_accuracy"] >= curve[0]["clean_accuracy"] - 0.04 - 1e-9 for p in curve)
    assert [p["pruned"] for p in curve] == sorted(p["pruned"] for p in curve)
    assert result.over_budget is not None  # stopped by the budget, not the limit
    assert result.over_budget["clean_accuracy"] < curve[0]["clean_accuracy"] - 0.04
    assert all(p["real_asr"] is not None and p["reversed_asr"] is None for p in curve)
    for model in (result.model, result.pruned_model):  # zero weights and biases: removed for good
        conv = dict(model.named_modules())["features.3"]
        assert (conv.weight[result.pruned] == 0).all() and (conv.bias[result.pruned] == 0).all()
    conv = dict(trojaned_digits.model.named_modules())["features.3"]
    assert (conv.weight[result.pruned] != 0).any()  # the original is untouched
    before = evaluate(trojaned_digits.model, digits.x_test, digits.y_test)["clean_accuracy"]
    assert evaluate(result.model, digits.x_test, digits.y_test)["clean_accuracy"] >= before - 0.05
    assert result.images == round(0.3 * len(digits.x_train)) and result.history.loss


def test_without_a_budget_it_prunes_to_the_fraction_and_bad_settings_are_one_line(trojaned_digits, digits):
    x, y = digits.x_train[:200], digits.y_train[:200]
    done = fine_prune(trojaned_digits.model, x, y, x, y, max_accuracy_drop=None, max_fraction=0.5, epochs=1)
    assert len(done.pruned) == 16 and done.over_budget is None
    for kwargs in ({"step": 0}, {"max_fraction": 1.5}, {"max_accuracy_drop": -0.1}, {"fraction": 2.0},
                   {"layer": "nope"}, {"layer": "features.1"}):
        with pytest.raises(TrojanscanError) as bad:
            fine_prune(trojaned_digits.model, x, y, x, y, **kwargs)
        _one_line(bad)


def test_repair_fine_prune_needs_no_scan(trojaned_digits, digits, tmp_path):
    model_file = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model_file)
    trojaned_digits.trigger.save(tmp_path / "m.trigger.npz")
    record = repair(model_file, None, digits, method="fine-prune", samples=300, fraction=0.3, epochs=2,
                    max_accuracy_drop=0.04, out=tmp_path / "fixed.safetensors", progress=False)
    d = record.to_dict()
    assert d["method"] == "fine-prune" and "scan" not in d and d["layer"] == "features.3"
    assert d["before"]["real_asr"] > 0.9 and d["before"]["reversed_asr"] is None
    assert d["fine_pruning"]["pruned"] > 0 and d["fine_pruning"]["pruned_only"]["clean_accuracy"] > 0.8
    assert d["parameters"]["lr"] == 2e-4 and (tmp_path / "fixed.safetensors").exists()
    with pytest.raises(TrojanscanError, match="needs the scan") as bad:
        repair(model_file, None, digits, method="unlearn")
    _one_line(bad)
    runner = CliRunner()
    result = runner.invoke(app, ["repair", str(model_file), "--data", "digits", "--method", "fine-prune",
                                 "--out", str(tmp_path / "cli.safetensors"), "--samples", "300",
                                 "--max-accuracy-drop", "4", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "dormant channels" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "fine-prune"
    result = runner.invoke(app, ["repair", str(model_file), "--data", "digits", "--method", "prune",
                                 "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "needs the scan" in result.output


def test_with_a_scan_it_measures_the_reversed_trigger_and_publishes(trojaned_digits, digits, tmp_path):
    from trojanscan import scan

    model_file = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model_file)
    result = scan(model_file, digits, clean_samples=300, steps=60, seed=0, out_dir=tmp_path / "scan",
                  progress=False)
    assert result.flagged_labels == [0]
    record = repair(model_file, tmp_path / "scan", digits, method="fine-prune", samples=300, fraction=0.3,
                    epochs=2, progress=False)
    d = record.to_dict()
    assert d["scan"]["flagged_labels"] == [0] and d["before"]["reversed_asr"] > 0.5
    assert all(p["reversed_asr"] is not None for p in d["fine_pruning"]["curve"])
    published = json.loads((tmp_path / "scan" / "mitigation.json").read_text())
    assert published["fine-prune"]["method"] == "fine-prune"
    assert "fine-prune" in (tmp_path / "scan" / "report.html").read_text()
