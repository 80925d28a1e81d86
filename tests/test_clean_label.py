"""Clean-label poisoning (label-consistent, SIG) and the pixel/pattern backdoor: what each stamps,
where, on which images, and that they are reachable from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from trojanscan import Trigger, TrojanscanError, train_classifier
from trojanscan.attacks import ATTACKS, SIG, CleanLabelData, LabelConsistent, Pattern
from trojanscan.cli import app
from trojanscan.models import build_model
from trojanscan.train import evaluate

QUICK_LC = {"surrogate_epochs": 1, "steps": 5}  # a weak surrogate and few steps: the contract, not the effect


@pytest.mark.parametrize("attack", [LabelConsistent(target=3, poison_rate=0.25, seed=1, **QUICK_LC),
                                    SIG(target=3, poison_rate=0.25, seed=1)], ids=["lc", "sig"])
def test_clean_label_poisons_an_exact_share_of_target_images_and_keeps_labels(attack, digits):
    x, y = digits.x_train, digits.y_train
    p = attack.poison(x, y, 10)
    n_target = int((y == 3).sum())
    chosen = p.poisoned_indices
    assert isinstance(p, CleanLabelData) and len(chosen) == round(0.25 * n_target)
    assert torch.equal(p.y, y) and torch.all(y[chosen] == 3)
    assert p.fraction_of_target_class == len(chosen) / n_target
    assert p.fraction_of_training_set == len(chosen) / len(y)
    changed = (p.x != x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), chosen), "every chosen image, and only those"
    assert p.x.min() >= 0 and p.x.max() <= 1
    assert torch.equal(attack.poison(x, y, 10).x, p.x), "seeded: the same poison twice"


def test_label_consistent_stays_within_eps_and_stamps_the_patch(digits):
    x, y = digits.x_train, digits.y_train
    rng_before = torch.get_rng_state()
    attack = LabelConsistent(target=0, poison_rate=0.5, eps=0.1, size=3, **QUICK_LC)
    trigger = attack.make_trigger(digits.input_shape)
    p = attack.poison(x, y, 10, trigger)
    assert torch.equal(torch.get_rng_state(), rng_before), "the surrogate leaves the global RNG alone"
    chosen, inside = p.poisoned_indices, trigger.mask.bool()
    moved = (p.x[chosen] - x[chosen])[:, :, ~inside]
    assert moved.abs().max() <= 0.1 + 1e-6 and moved.abs().max() > 0.05, "PGD moved pixels, within eps"
    assert torch.equal(p.x[chosen][:, :, inside], trigger.pattern[:, inside].expand(len(chosen), -1, -1))
    assert trigger.area == 9 and trigger.kind == "patch" and trigger.params["attack"] == "label-consistent"
    clean = trigger.apply(x[:5])  # the test-time trigger is the plain patch, no perturbation
    assert torch.equal(clean[:, :, ~inside], x[:5][:, :, ~inside])
    surrogate = build_model("mlp", 10, digits.input_shape)  # a given surrogate is used, not trained
    given = LabelConsistent(target=0, poison_rate=0.5, eps=0.1, steps=5, surrogate=surrogate)
    given.poison(x, y, 10)
    assert given.surrogate_ is surrogate and attack.surrogate_ is not None


def test_sig_adds_a_horizontal_sinusoid_of_the_stated_amplitude_and_clips():
    attack = SIG(target=1, delta=40 / 255, frequency=6)
    trigger = attack.make_trigger((3, 10, 32))
    v = trigger.offset
    j = torch.arange(32, dtype=torch.float64)
    row = (40 / 255 * torch.sin(2 * math.pi * j * 6 / 32)).float()
    assert torch.allclose(v, row.expand(3, 10, 32), atol=1e-6), "v(i, j) = delta sin(2 pi j f / W)"
    assert v.max() == pytest.approx(40 / 255, abs=1e-6) and v.min() == pytest.approx(-40 / 255, abs=1e-6)
    assert int(torch.fft.rfft(v[0, 0]).abs().argmax()) == 6, "six periods across the width"
    assert trigger.area == 0 and trigger.kind == "additive"
    mid = torch.full((2, 3, 10, 32), 0.5)
    assert torch.allclose(trigger.apply(mid), mid + v, atol=1e-6)
    assert torch.allclose(trigger.apply(torch.ones(1, 3, 10, 32)), 1 + v.clamp(max=0), atol=1e-6)
    assert torch.allclose(trigger.apply(torch.zeros(1, 3, 10, 32)), v.clamp(min=0), atol=1e-6)


def test_sig_ramp_brightens_towards_the_right_edge():
    v = SIG(target=1, delta=30 / 255, wave="ramp").make_trigger((1, 4, 28)).offset
    assert torch.allclose(v[0, 0], torch.arange(1, 29) / 28 * (30 / 255), atol=1e-6)  # v(i, j) = delta j / W
    assert torch.equal(v[0, 0], v[0, 3]) and float(v.max()) == pytest.approx(30 / 255)


def test_sig_stamps_test_inputs_with_its_test_amplitude_and_poisons_with_the_training_one():
    x = torch.full((20, 1, 8, 16), 0.5)
    y = torch.arange(20) % 2
    attack = SIG(target=1, poison_rate=0.5, delta=20 / 255, test_delta=60 / 255)
    trigger = attack.make_trigger((1, 8, 16))
    assert trigger.offset.abs().max() == pytest.approx(60 / 255, abs=1e-6)
    assert attack.params()["test_delta"] == pytest.approx(60 / 255)
    poisoned = attack.poison(x, y, 2)
    moved = (poisoned.x - x).abs().amax(dim=(1, 2, 3))
    assert torch.allclose(moved[poisoned.poisoned_indices], torch.tensor(20 / 255), atol=1e-6)
    assert moved[[i for i in range(20) if i not in poisoned.poisoned_indices.tolist()]].max() == 0
    assert SIG(delta=30 / 255).test_delta == pytest.approx(30 / 255)  # by default the same signal


@pytest.mark.parametrize("channels", [1, 3])
def test_pattern_sets_exactly_its_pixels_on_every_channel(channels):
    x = torch.full((4, channels, 10, 12), 0.25)  # H != W: a transposed index would show
    # rows/cols from ART's description at distance 2: (-2,-2), (-3,-3), (-2,-4), (-4,-2) of a 10×12 image
    expected = {"pixel": {(8, 10)}, "checker": {(8, 10), (7, 9), (8, 8), (6, 10)}}
    for shape, pixels in expected.items():
        out = Pattern(target=1, shape=shape, value=0.75).make_trigger((channels, 10, 12)).apply(x)
        changed = (out != x).any(0).any(0)
        assert {tuple(p) for p in torch.nonzero(changed).tolist()} == pixels, shape
        for r, c in pixels:
            assert torch.all(out[:, :, r, c] == 0.75), "every channel of every image"
    corner = Pattern(shape="pixel", distance=1).make_trigger((channels, 10, 12))
    assert torch.nonzero(corner.mask).tolist() == [[9, 11]]


def test_pattern_backdoor_trained_on_digits_fires(digits):
    attack = Pattern(target=2, poison_rate=0.1, shape="checker", seed=0)
    result = train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, attack=attack, seed=0,
                              progress=False)
    assert result.attack_success_rate >= 0.9 and result.clean_accuracy >= 0.9
    assert result.poison_fractions == {"of_training_set": round(0.1 * 1437) / 1437}
    elsewhere = Pattern(target=2, shape="checker", distance=6).make_trigger(digits.input_shape)
    moved = evaluate(result.model, digits.x_test, digits.y_test, elsewhere)
    assert moved["attack_success_rate"] < 0.3, "the model obeys those pixels, not any mark"


def test_bad_options_are_one_line_errors(digits):
    x, y = digits.x_train, digits.y_train
    cases = [
        (lambda: LabelConsistent(poison_rate=1.0), "poison rate"),
        (lambda: SIG(poison_rate=0), "poison rate"),
        (lambda: LabelConsistent(eps=-0.1), "eps"),
        (lambda: LabelConsistent(eps=2), "eps"),
        (lambda: LabelConsistent(steps=-1), "steps"),
        (lambda: LabelConsistent(step_size=0.0), "step_size"),
        (lambda: LabelConsistent(surrogate_epochs=0), "surrogate_epochs"),
        (lambda: LabelConsistent(color="purple"), "colour"),
        (lambda: LabelConsistent(surrogate="resnet"), "nn.Module"),
        (lambda: SIG(delta=0), "delta"),
        (lambda: SIG(test_delta=2.0), "test_delta"),
        (lambda: SIG(wave="square"), "sine or ramp"),
        (lambda: SIG(frequency=-1), "frequency"),
        (lambda: SIG(frequency=math.inf), "frequency"),
        (lambda: SIG(target=5).poison(x[y != 5], y[y != 5], 10), "no training image has the target"),
        (lambda: SIG(target=5, poison_rate=0.001).poison(x, y, 10), "poisons none"),
        (lambda: SIG(target=12).poison(x, y, 10), "outside the data's labels"),
        (lambda: Pattern(shape="star"), "unknown pattern shape"),
        (lambda: Pattern(distance=0), "distance"),
        (lambda: Pattern(value=2), "value"),
        (lambda: Pattern(distance=4).make_trigger((1, 4, 4)), "does not fit"),
        (lambda: Trigger(torch.zeros(4, 4), torch.zeros(1, 4, 4), 0, offset=torch.full((1, 4, 4), 2.0)),
         "offset"),
    ]
    for make, needle in cases:
        with pytest.raises(TrojanscanError) as bad:
            make()
        assert needle in str(bad.value) and "\n" not in str(bad.value), (needle, str(bad.value))


@pytest.mark.parametrize("name,options,bad_option", [
    ("pattern", ["shape=pixel"], "shape=star"),
    ("sig", ["delta=0.2", "frequency=4"], "delta=0"),
    ("label-consistent", ["eps=0.1", "steps=3", "surrogate_epochs=1"], "eps=-1"),
])
def test_attacks_train_from_the_cli_and_their_triggers_round_trip(name, options, bad_option, digits,
                                                                  tmp_path):
    assert name in ATTACKS
    model = tmp_path / "m.safetensors"
    args = ["train", "--data", "digits", "--epochs", "1", "--attack", name, "--target", "4",
            "--poison-rate", "0.5", "--out", str(model), "--json", str(tmp_path / "r.json")]
    for option in options:
        args += ["--option", option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    key, value = options[0].split("=")
    assert record["parameters"]["attack"][key] == (value if name == "pattern" else float(value))
    fractions = record["poison_fractions"]
    if name == "pattern":
        assert fractions == {"of_training_set": pytest.approx(round(0.5 * 1437) / 1437)}
    else:
        assert fractions["of_target_class"] == pytest.approx(0.5, abs=0.01)
        n_target = int((digits.y_train == 4).sum())
        assert fractions["of_training_set"] == pytest.approx(fractions["of_target_class"] * n_target / 1437)
    trigger = Trigger.load(tmp_path / "m.trigger.npz")
    x = torch.rand(3, 1, 16, 16)
    assert trigger.target == 4 and trigger.params["attack"] == name
    stamped = trigger.apply(x)
    assert not torch.equal(stamped, x) and stamped.min() >= 0 and stamped.max() <= 1
    bad = CliRunner().invoke(app, ["train", "--data", "digits", "--attack", name, "--option", bad_option,
                                   "--out", str(tmp_path / "n.safetensors")])
    assert bad.exit_code == 2 and bad_option.split("=")[0] in bad.output, bad.output


def test_additive_trigger_file_round_trip(tmp_path):
    trigger = SIG(target=2, frequency=3).make_trigger((3, 8, 8))
    trigger.save(tmp_path / "sig.trigger.npz")
    back = Trigger.load(tmp_path / "sig.trigger.npz")
    assert torch.equal(back.offset, trigger.offset) and back.kind == "additive"
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(back.apply(x), trigger.apply(x)) and back.params == trigger.params
