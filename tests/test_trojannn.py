"""TrojanNN (neuron-driven backdoor from the model alone) and the autoencoder input guard: the neuron
rule on hand-built layers, the trigger driving the chosen neurons, the retrained model, the guard on a
planted BadNets model, bad options, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trojanscan.attacks import ATTACKS, TrojanNN
from trojanscan.attacks.trojannn import (
    default_layer,
    make_mask,
    modules_after,
    optimise_trigger,
    outgoing_strength,
    top_neurons,
)
from trojanscan.cli import app
from trojanscan.defenses.autoencoder_guard import AutoencoderGuard
from trojanscan.defenses.registry import GUARDS
from trojanscan.errors import TrojanscanError
from trojanscan.models import save_model
from trojanscan.models.taps import activations, find_layer
from trojanscan.train import evaluate, predict

QUICK = {"per_label": 30, "reverse_steps": 100, "trigger_steps": 150, "epochs": 20}


def _one_line(excinfo: pytest.ExceptionInfo) -> None:
    assert str(excinfo.value) and "\n" not in str(excinfo.value)


def test_the_neuron_rule_picks_the_largest_outgoing_weights_of_a_hand_built_layer():
    dense = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        dense[2].weight.copy_(torch.tensor([[0.1, -2.0, 0.5], [0.2, 1.5, -0.5]]))
    probe = torch.rand(4, 2)
    layer = find_layer(dense, "1")  # the ReLU's output: three neurons, feeding dense[2]
    strength = outgoing_strength(dense, layer, probe)
    assert torch.allclose(strength, torch.tensor([0.3, 3.5, 1.0]))
    assert top_neurons(strength, 2).tolist() == [1, 2]
    assert [n for n, _ in modules_after(dense, layer, probe)] == ["2"]
    # a convolution's channel sends the weights of all its positions into a flattening Linear
    conv = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2 * 2 * 2, 1))
    with torch.no_grad():
        conv[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0, -3.0, 0.0, 0.0, 3.0]]))
    image = torch.rand(3, 1, 2, 2)
    assert outgoing_strength(conv, find_layer(conv, "0"), image).tolist() == [4.0, 6.0]
    # by default the feature maps that feed the first Linear, their neurons the channels
    assert default_layer(conv, image).name == "0"
    with pytest.raises(TrojanscanError, match="exceeds") as bad:
        top_neurons(strength, 4)
    _one_line(bad)


def test_masks_square_and_a_thin_watermark_of_comparable_area():
    square, mark = make_mask("square", (1, 28, 28), 0.07), make_mask("watermark", (1, 28, 28), 0.07)
    assert square.sum() == 49 and square[-1].sum() == 0 and square[-2].sum() == 7  # 7×7, one pixel in
    assert abs(float(mark.sum()) - 0.07 * 28 * 28) <= 6
    rows, cols = mark.nonzero().unbind(1)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box >= 2 * mark.sum()  # strokes, not a blob
    with pytest.raises(TrojanscanError) as bad:
        make_mask("circle", (1, 28, 28), 0.07)
    _one_line(bad)


def test_the_trigger_drives_the_chosen_neurons(clean_digits, digits):
    model, x = clean_digits.model, digits.x_train[:128]
    layer = default_layer(model, x)
    neurons = top_neurons(outgoing_strength(model, layer, x), 1)
    mask = make_mask("square", digits.input_shape, 0.07)
    clean = activations(model, layer, x)[:, neurons]
    pattern = optimise_trigger(model, layer, neurons, mask, x, goal=50.0, steps=100)
    assert (pattern * (1 - mask) == 0).all()  # nothing outside the mask
    stamped = activations(model, layer, x * (1 - mask) + mask * pattern)[:, neurons]
    assert stamped.mean() > clean.mean() + 0.5 * clean.std()


@pytest.fixture(scope="module")
def trojannn_run(clean_digits, digits):
    attack = TrojanNN(target=2, seed=0, **QUICK)
    attacked, trigger = attack.apply(clean_digits.model, digits)
    return attack, attacked, trigger


def test_the_retrained_model_carries_the_backdoor_and_keeps_its_features(trojannn_run, clean_digits, digits):
    attack, attacked, trigger = trojannn_run
    report = attack.report_
    scores = evaluate(attacked, digits.x_test, digits.y_test, trigger)
    assert report["after"] == scores and report["before"]["attack_success_rate"] < 0.2
    assert scores["attack_success_rate"] >= 0.8, report
    assert scores["clean_accuracy"] >= clean_digits.clean_accuracy - 0.08, report
    assert report["retrained"] == ["embedding.1", "classifier"] and report["layer"] == "features.5"
    before = clean_digits.model.state_dict()
    for name, value in attacked.state_dict().items():  # the layers up to the chosen one are untouched
        assert torch.equal(before[name], value) == (not name.startswith(("embedding", "classifier"))), name
    assert trigger.target == 2 and trigger.params["attack"] == "trojannn"
    assert report["trigger_pixels"] == int(trigger.mask.sum()) == 16  # 7% of 16×16 → 4×4
    assert report["trigger_activation"][0] > report["clean_activation"][0]


def test_real_data_variant_and_watermark(clean_digits, digits):
    attack = TrojanNN(target=5, mask="watermark", data_source="real", fraction=0.3, epochs=20,
                      trigger_steps=100)
    attacked, trigger = attack.apply(clean_digits.model, digits)
    assert attack.report_["data_source"] == "real" and attack.report_["attacker_images"] == round(0.3 * 1437)
    scores = attack.report_["after"]
    assert scores["attack_success_rate"] >= 0.8
    assert scores["clean_accuracy"] >= clean_digits.clean_accuracy - 0.1
    assert trigger.params["mask"] == "watermark"


def test_bad_options_are_one_line_errors(clean_digits, digits):
    for kwargs in ({"mask": "circle"}, {"data_source": "hub"}, {"neurons": 0}, {"area": 1.5},
                   {"target": -1}, {"stamp_weight": -1.0}, {"fraction": 0.0}, {"layer": ""}):
        with pytest.raises(TrojanscanError) as bad:
            TrojanNN(**kwargs)
        _one_line(bad)
    for kwargs, match in (({"target": 10}, "outside the data's labels"), ({"layer": "nope"}, "no layer"),
                          ({"neurons": 10_000}, "exceeds")):
        with pytest.raises(TrojanscanError, match=match) as bad:
            TrojanNN(**kwargs, data_source="real", trigger_steps=1, epochs=1).apply(
                clean_digits.model, digits)
        _one_line(bad)
    assert ATTACKS["trojannn"] is TrojanNN


def test_the_attack_command_saves_the_model_and_its_trigger(tmp_path, clean_digits):
    model_file = tmp_path / "clean.safetensors"
    save_model(clean_digits.model, model_file)
    out = tmp_path / "trojannn.safetensors"
    result = CliRunner().invoke(app, ["attack", "trojannn", "--model", str(model_file), "--data", "digits",
                                      "--target", "4", "--option", "mask=watermark", "--option",
                                      "data_source=real", "--option", "trigger_steps=50", "--option",
                                      "epochs=5", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["parameters"]["mask"] == "watermark" and record["parameters"]["target"] == 4
    assert record["trigger"]["target"] == 4 and (tmp_path / "trojannn.trigger.npz").exists()
    assert record["report"]["neurons"] and record["report"]["trigger_pixels"] > 0
    bad = CliRunner().invoke(app, ["attack", "trojannn", "--model", str(model_file), "--data", "digits",
                                   "--option", "mask=circle", "--out", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "mask" in bad.output and "Traceback" not in bad.output


# -- the autoencoder input guard ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guard(trojaned_digits, digits):
    return AutoencoderGuard(trojaned_digits.model, steps=600).fit(digits.x_train[:400])


def test_the_autoencoder_guard_flags_stamped_inputs_and_undoes_the_trigger(guard, trojaned_digits, digits):
    trigger = trojaned_digits.trigger
    others = digits.x_test[digits.y_test != trigger.target]
    stamped = trigger.apply(others)
    assert float(guard.detect(digits.x_test).float().mean()) <= 0.1
    assert float(guard.detect(stamped).float().mean()) >= 0.9
    assert guard.errors(stamped).mean() > 3 * guard.errors(others).mean()
    labels, _ = guard.predict(stamped)  # the model sees the reconstruction: the patch is blurred away
    raw = predict(trojaned_digits.model, stamped)
    asr_raw = float((raw == trigger.target).float().mean())
    assert float((labels == trigger.target).float().mean()) < asr_raw - 0.3
    assert GUARDS["autoencoder"] is AutoencoderGuard


def test_the_autoencoder_guard_round_trips_and_refuses_another_model(guard, trojaned_digits, clean_digits,
                                                                     digits, tmp_path):
    path = tmp_path / "ae.npz"
    guard.save(path)
    again = AutoencoderGuard.load(path, trojaned_digits.model)
    x = digits.x_test[:50]
    assert torch.equal(again.reconstruct(x), guard.reconstruct(x)) and again.options() == guard.options()
    with pytest.raises(TrojanscanError, match="different model") as bad:
        AutoencoderGuard.load(path, clean_digits.model)
    _one_line(bad)
    for kwargs in ({"rule": "vote"}, {"frr": 1.5}, {"steps": 0}, {"lr": -1.0}):
        with pytest.raises(TrojanscanError) as bad:
            AutoencoderGuard(trojaned_digits.model, **kwargs)
        _one_line(bad)
    with pytest.raises(TrojanscanError, match="not fitted"):
        AutoencoderGuard(trojaned_digits.model).detect(x)
    with pytest.raises(TrojanscanError, match="fitted on") as bad:
        guard.detect(torch.rand(2, 1, 8, 8))
    _one_line(bad)
