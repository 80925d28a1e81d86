"""Workflows end to end: a model's input convention honoured by every command, repairing TorchScript
models, model attacks from the command line, method options from text."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trojanscan.api import held_out, repair, scan
from trojanscan.cli import app
from trojanscan.defenses.tabor import TaborOptions, TaborWeights
from trojanscan.errors import TrojanscanError
from trojanscan.models import load_model, save_model
from trojanscan.options import parse_options

runner = CliRunner()
MEAN, STD = 0.5, 0.05


class ExpectsNormalised(nn.Module):
    """A third-party-style model: it takes (x - MEAN) / STD, not [0, 1] pixels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mean, self.std = MEAN, STD

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z * self.std + self.mean)


@pytest.fixture(scope="module")
def normalised_pt(trojaned_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("norm") / "theirs.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(ExpectsNormalised(trojaned_digits.model).eval()).save(str(path))
    return path


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_held_out_purposes_keep_their_draws(digits):
    g = torch.Generator().manual_seed(5 + 1)  # calibration: the training split, seed + 1
    assert torch.equal(held_out(digits, "calibration", 50, 5)[0],
                       digits.x_train[torch.randperm(len(digits.x_train), generator=g)[:50]])
    with pytest.raises(TrojanscanError, match="unknown held-out purpose"):
        held_out(digits, "training", 5)


def test_a_normalised_model_is_evaluated_scanned_guarded_and_repaired(normalised_pt, trojaned_digits,
                                                                      tmp_path):
    conv = ["--mean", str(MEAN), "--std", str(STD)]
    wrong = runner.invoke(app, ["evaluate", str(normalised_pt), "--data", "digits",
                                "--json", str(tmp_path / "wrong.json")])
    assert wrong.exit_code == 0
    _ok(["evaluate", str(normalised_pt), "--data", "digits", *conv, "--json", str(tmp_path / "ev.json")])
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["clean_accuracy"] == pytest.approx(trojaned_digits.clean_accuracy, abs=1e-6)
    assert json.loads((tmp_path / "wrong.json").read_text())["clean_accuracy"] < ev["clean_accuracy"] - 0.2
    _ok(["scan", str(normalised_pt), "--data", "digits", "--clean-samples", "300", "--steps", "60",
         *conv, "--out", str(tmp_path / "scan")])
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["flagged_labels"] == [0]
    _ok(["strip", "calibrate", str(normalised_pt), "--data", "digits", "--n", "10", "--samples", "100",
         *conv, "--out", str(tmp_path / "strip.npz")])
    # the repair must see the model as the scan did
    bad = runner.invoke(app, ["repair", str(normalised_pt), "--scan", str(tmp_path / "scan"), "--data",
                              "digits", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "--mean/--std" in bad.output
    _ok(["repair", str(normalised_pt), "--scan", str(tmp_path / "scan"), "--data", "digits", *conv,
         "--method", "unlearn", "--fraction", "0.5", "--epochs", "2", "--out", str(tmp_path / "fixed.pt"),
         "--json", str(tmp_path / "repair.json")])
    record = json.loads((tmp_path / "repair.json").read_text())
    assert record["after"]["reversed_asr"] < record["before"]["reversed_asr"]
    # the repaired file still expects normalised inputs: same CA with --mean/--std as the record says
    _ok(["evaluate", str(tmp_path / "fixed.pt"), "--data", "digits", *conv, "--json",
         str(tmp_path / "ev2.json")])
    again = json.loads((tmp_path / "ev2.json").read_text())
    assert again["clean_accuracy"] == pytest.approx(record["after"]["clean_accuracy"], abs=1e-6)
    assert load_model(tmp_path / "fixed.pt").metadata["input_convention"].startswith("[0, 1] pixels, then")


def test_unlearning_repairs_a_torchscript_model(trojaned_digits, digits, tmp_path):
    path = tmp_path / "m.pt"
    save_model(trojaned_digits.model, path)
    trojaned_digits.trigger.save(tmp_path / "m.trigger.npz")  # the real trigger, only measured
    result = scan(path, digits, clean_samples=300, steps=60, out_dir=tmp_path / "scan", progress=False)
    record = repair(path, tmp_path / "scan", digits, method="unlearn", fraction=0.5, epochs=2,
                    out=tmp_path / "fixed.pt", progress=False)
    assert result.flagged_labels == [0]
    assert record.after["real_asr"] < 0.5 < record.before["real_asr"]
    assert isinstance(load_model(tmp_path / "fixed.pt").module, torch.jit.ScriptModule)
    # pruning needs hooks, which TorchScript does not run: one line, exit 2
    bad = runner.invoke(app, ["repair", str(path), "--scan", str(tmp_path / "scan"), "--data", "digits",
                              "--method", "prune", "--out", str(tmp_path / "p.pt")])
    assert bad.exit_code == 2 and "TorchScript" in bad.output and "Traceback" not in bad.output


def test_model_attack_from_the_command_line(clean_digits, tmp_path):
    save_model(clean_digits.model, tmp_path / "clean.safetensors")
    _ok(["attack", "finetune", "--model", str(tmp_path / "clean.safetensors"), "--data", "digits",
         "--target", "3", "--option", "epochs=3", "--out", str(tmp_path / "bad.safetensors"),
         "--json", str(tmp_path / "attack.json")])
    record = json.loads((tmp_path / "attack.json").read_text())
    assert record["after"]["attack_success_rate"] >= 0.8 and record["parameters"]["epochs"] == 3
    assert (tmp_path / "bad.trigger.npz").is_file()
    out = _ok(["evaluate", str(tmp_path / "bad.safetensors"), "--data", "digits"])
    assert "trigger saved beside the model" in out
    for args, message in ((["attack", "badnets"], "poisoning attack"),
                          (["attack", "finetune", "--option", "speed=9"], "no option 'speed'"),
                          (["train", "--attack", "finetune"], "model attack")):
        if args[0] == "attack":
            args = [*args, "--model", str(tmp_path / "clean.safetensors"), "--data", "digits",
                    "--out", str(tmp_path / "x.safetensors")]
        else:
            args = [*args, "--data", "digits", "--out", str(tmp_path / "x.safetensors")]
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_options_are_read_against_the_dataclass():
    assert parse_options(TaborOptions, ["steps=5", "weights.alone=0.5", "schedule=paper"]) == {
        "steps": 5, "weights": TaborWeights(alone=0.5), "schedule": "paper"}
    for pairs, message in ((["speed=1"], "no option 'speed'"), (["steps=five"], "expected int"),
                           (["threshold=nan"], "finite"), (["steps"], "KEY=VALUE"),
                           (["weights.size=1"], "no option 'size'")):
        with pytest.raises(TrojanscanError, match=message):
            parse_options(TaborOptions, pairs)


def test_scan_options_from_flags_and_option_agree_or_fail(trojaned_digits, tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    base = ["scan", str(model), "--data", "digits", "--clean-samples", "60", "--labels", "0,1,2"]
    _ok([*base, "--option", "seed=3", "--option", "steps=3", "--out", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["seed"] == 3
    for extra, message in ((["--seed", "1", "--option", "seed=3"], "contradicts"),
                           (["--chunk", "3", "--option", "chunk=5"], "contradicts"),
                           (["--tabor-weights", "alone=0.1"], "need --method tabor")):
        bad = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and message in bad.output, bad.output
