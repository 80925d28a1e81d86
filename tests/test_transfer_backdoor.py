"""The transfer-learning backdoor: the pruning-robust neuron ranking on a hand-built layer, the
autoencoder-aware trigger, the retrained teacher, the student that inherits the backdoor, bad options,
the command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trojanscan.attacks import ATTACKS, TransferBackdoor, TrojanNN
from trojanscan.attacks.transfer import make_student, robust_ranking, student_scores, student_trigger
from trojanscan.attacks.trojannn import default_layer, make_mask, optimise_trigger
from trojanscan.cli import app
from trojanscan.data import Dataset
from trojanscan.errors import TrojanscanError
from trojanscan.models import save_model
from trojanscan.models.taps import activations, find_layer

# the 16×16 digits need a stronger retraining than the default for the student to inherit the backdoor
QUICK = {"trigger_steps": 150, "epochs": 20, "fraction": 0.3, "ae_steps": 300, "lr": 1e-3,
         "feature_weight": 5.0}


def _one_line(excinfo: pytest.ExceptionInfo) -> None:
    assert str(excinfo.value) and "\n" not in str(excinfo.value)


def _upper_digits(digits: Dataset) -> Dataset:
    """The student task: digits 5–9, relabelled 0–4."""
    tr, te = digits.y_train >= 5, digits.y_test >= 5
    return Dataset(digits.x_train[tr], digits.y_train[tr] - 5, digits.x_test[te], digits.y_test[te] - 5, 5,
                   "digits 5-9", digits.sha256)


def test_an_active_strongly_connected_neuron_beats_a_dormant_one_with_bigger_weights():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():  # neuron 0 never fires on positive inputs; 1 and 2 do, 1 the more
        net[0].weight.copy_(torch.tensor([[-1.0, -1.0], [2.0, 2.0], [1.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[5.0, 1.5, 0.2], [-5.0, -1.5, 0.2]]))  # outgoing 10, 3, 0.4
    probe, layer = torch.rand(16, 2) + 0.1, find_layer(net, "1")
    assert TrojanNN(neurons=1).rank(net, layer, probe)[1].tolist() == [0]  # by weight alone: the dormant one
    scores, chosen = TransferBackdoor(neurons=1, dormant_fraction=0.4).rank(net, layer, probe)
    assert chosen.tolist() == [1] and scores[0] == -torch.inf
    # the documented score: percentile ranks of activity and of outgoing weight, summed
    score = robust_ranking(torch.tensor([0.0, 3.0, 1.0]), torch.tensor([10.0, 3.0, 0.4]), 0.0)
    assert torch.allclose(score, torch.tensor([1.0, 1.5, 0.5]))
    with pytest.raises(TrojanscanError, match="active neurons") as bad:
        TransferBackdoor(neurons=3, dormant_fraction=0.4).rank(net, layer, probe)
    _one_line(bad)


def test_the_trigger_raises_the_chosen_neurons_and_the_autoencoder_term_lowers_its_error(clean_digits,
                                                                                          digits):
    model, x = clean_digits.model, digits.x_train[:128]
    layer = default_layer(model, x)
    attack = TransferBackdoor(ae_steps=200, ae_weight=0.05)
    neurons = attack.rank(model, layer, x)[1]
    mask = make_mask("square", digits.input_shape, 0.07)
    goal = 5 * float(activations(model, layer, x).max())
    term = attack.trigger_loss(model, x, goal)
    with_term = optimise_trigger(model, layer, neurons, mask, x, goal, steps=60, extra_loss=term)
    without = optimise_trigger(model, layer, neurons, mask, x, goal, steps=60)
    stamp = [x * (1 - mask) + mask * p for p in (with_term, without)]
    errors = [float(attack.guard_.errors(s).mean()) for s in stamp]
    assert errors[0] < errors[1]
    clean = activations(model, layer, x)[:, neurons].mean()
    assert activations(model, layer, stamp[0])[:, neurons].mean() > clean


@pytest.fixture(scope="module")
def transfer_run(clean_digits, digits):
    attack = TransferBackdoor(target=2, seed=0, **QUICK)
    teacher, trigger = attack.apply(clean_digits.model, digits)
    return attack, teacher, trigger


def test_the_retrained_teacher_carries_the_backdoor_and_keeps_clean_accuracy(transfer_run, clean_digits):
    attack, _, trigger = transfer_run
    report = attack.report_
    assert report["after"]["attack_success_rate"] >= 0.9, report
    assert report["after"]["clean_accuracy"] >= clean_digits.clean_accuracy - 0.1, report
    assert report["before"]["attack_success_rate"] < 0.2
    assert not set(report["neurons"]) & set(report["dormant_neurons"])  # never a dormant neuron
    assert len(report["dormant_neurons"]) == 16 and report["data_source"] == "real"
    assert 0 <= report["attacker_guard"]["flag_rate"] <= 1
    assert trigger.params["attack"] == "transfer" and ATTACKS["transfer"] is TransferBackdoor


def test_the_student_inherits_the_backdoor(transfer_run, clean_digits, digits):
    _, teacher, trigger = transfer_run
    task = _upper_digits(digits)
    pupil = make_student(teacher, task, epochs=20, batch_size=64)
    aimed = student_trigger(pupil.model, task, trigger)
    scores = student_scores(pupil.model, task, aimed)
    honest_model = make_student(clean_digits.model, task, epochs=20, batch_size=64).model
    honest = student_scores(honest_model, task, student_trigger(honest_model, task, trigger))
    assert pupil.head == "classifier" and pupil.model.classifier.out_features == 5
    assert scores["clean_accuracy"] >= 0.85, scores
    assert scores["asr"] >= 0.8 and honest["asr"] < 0.5, (scores, honest)
    assert all(not p.requires_grad for p in pupil.model.parameters())
    features = [k for k in teacher.state_dict() if not k.startswith("classifier")]
    assert all(torch.equal(teacher.state_dict()[k], pupil.model.state_dict()[k]) for k in features)
    assert aimed.target == scores["backdoor_label"] == aimed.params["student_label"]


def test_bad_options_are_one_line_errors(clean_digits, digits):
    for kwargs in ({"ae_weight": -1.0}, {"ae_weight": float("nan")}, {"feature_weight": "x"},
                   {"dormant_fraction": 1.0}, {"ae_steps": 0}, {"feature_scale": 0.0}, {"mask": "circle"},
                   {"target": -1}):
        with pytest.raises(TrojanscanError) as bad:
            TransferBackdoor(**kwargs)
        _one_line(bad)
    for kwargs in ({"epochs": 0}, {"lr": -1.0}):
        with pytest.raises(TrojanscanError) as bad:
            make_student(clean_digits.model, digits, **kwargs)
        _one_line(bad)
    with pytest.raises(TrojanscanError, match="last Linear") as bad:
        make_student(nn.Sequential(nn.Flatten(), nn.Linear(256, 10), nn.ReLU()), digits)
    _one_line(bad)


def test_the_attack_command_runs_the_transfer_attack(tmp_path, clean_digits):
    model_file, out = tmp_path / "clean.safetensors", tmp_path / "transfer.safetensors"
    save_model(clean_digits.model, model_file)
    options = ["trigger_steps=30", "epochs=2", "ae_steps=50", "ae_weight=0.1", "feature_units=2"]
    result = CliRunner().invoke(app, ["attack", "transfer", "--model", str(model_file), "--data", "digits",
                                      "--target", "4", *[a for o in options for a in ("--option", o)],
                                      "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["parameters"]["feature_units"] == 2 and record["parameters"]["data_source"] == "real"
    assert record["trigger"]["target"] == 4 and (tmp_path / "transfer.trigger.npz").exists()
    assert "attacker_guard" in record["report"]
    bad = CliRunner().invoke(app, ["attack", "transfer", "--model", str(model_file), "--data", "digits",
                                   "--option", "dormant_fraction=1.5", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "dormant_fraction" in bad.output and "Traceback" not in bad.output
