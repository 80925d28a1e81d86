"""--precision: auto takes bfloat16 only where it is native and the model's convolutions are not grouped;
a bfloat16 model is a wrapped copy (the caller's module untouched) that returns float32 logits close to
float32's; a scan records its precision and never resumes from labels searched in the other one; the
verdict still finds a planted backdoor; bad names are one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trojanscan import scan
from trojanscan.cli import app
from trojanscan.devices import Reduced, place, plain_convolutions, resolve_precision, unplace
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, save_model

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr("trojanscan.devices.native_bfloat16", lambda device: True)


@pytest.fixture
def not_native(monkeypatch):
    monkeypatch.setattr("trojanscan.devices.native_bfloat16", lambda device: False)


def _depthwise() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(576, 3))


def test_auto_takes_bfloat16_only_for_plain_convolutions_on_native_hardware(native):
    cnn, mlp = build_model("mnist-cnn", 10, (1, 28, 28)), build_model("mlp", 10, (1, 28, 28))
    assert plain_convolutions(cnn) and not plain_convolutions(mlp) and not plain_convolutions(_depthwise())
    assert resolve_precision("auto", cnn, CPU) == "bfloat16"
    assert resolve_precision("auto", mlp, CPU) == "float32"  # nothing to gain
    assert resolve_precision("auto", _depthwise(), CPU) == "float32"  # grouped convolutions: slower
    assert resolve_precision("bfloat16", mlp, CPU) == "bfloat16"  # asked for by name: as asked
    scripted = torch.jit.script(cnn)
    assert plain_convolutions(scripted)  # TorchScript modules keep their convolutions' settings
    assert not plain_convolutions(torch.jit.script(_depthwise()))


def test_auto_stays_float32_without_bfloat16_units(not_native):
    assert resolve_precision("auto", build_model("mnist-cnn", 10, (1, 28, 28)), CPU) == "float32"


@pytest.mark.parametrize("name", ["half", "fp16", ""])
def test_unknown_precisions_are_one_line_errors(name):
    with pytest.raises(TrojanscanError, match="choose one of float32, bfloat16, auto"):
        resolve_precision(name, build_model("mlp", 3, (1, 4, 4)), CPU)


def test_bfloat16_is_a_wrapped_copy_with_float32_logits_close_to_float32(trojaned_digits, digits):
    model = trojaned_digits.model.eval()
    reduced = place(model, "cpu", "bfloat16")
    assert isinstance(reduced, Reduced) and reduced.model is not model
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's module as it was
    x = digits.x_test[:64]
    with torch.no_grad():
        full, low = model(x), reduced(x)
    assert low.dtype == torch.float32
    assert (low.argmax(1) == full.argmax(1)).float().mean() >= 0.95
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    assert not isinstance(unplace(reduced), Reduced)
    assert place(model, "cpu", "float32") is model


def test_a_scan_records_its_precision_and_never_resumes_across_precisions(trojaned_digits, digits, tmp_path):
    options = dict(clean_samples=60, steps=8, labels=[0, 1, 2], progress=False)
    low = scan(trojaned_digits.model, digits, precision="bfloat16", out_dir=tmp_path, **options)
    full = scan(trojaned_digits.model, digits, precision="float32", out_dir=tmp_path, **options)
    fresh = scan(trojaned_digits.model, digits, precision="float32", **options)
    assert low.parameters["precision"] == "bfloat16" and full.parameters["precision"] == "float32"
    assert low.parameters["fingerprint"] != full.parameters["fingerprint"]
    assert low.model_sha256 == full.model_sha256  # the same model to a repair that checks the scan
    assert [r.l1_norm for r in full.labels] == [r.l1_norm for r in fresh.labels]  # searched again


def test_the_verdict_in_bfloat16_finds_the_planted_backdoor(trojaned_digits, digits):
    result = scan(trojaned_digits.model, digits, precision="bfloat16", decision="verdict", progress=False)
    assert result.infected and result.extra["verdict"]["targets"] == [0]
    # rule 9 read the head through the bfloat16 wrapper: the paper's MNIST net flattens its map
    assert result.extra["verdict"]["evidence"][0]["name"] == "trigger size ratio (positional head)"


def test_the_cli_takes_and_checks_a_precision(trojaned_digits, tmp_path):
    for command in (["scan"], ["audit"], ["bench", "zoo"]):
        assert "--precision" in runner.invoke(app, [*command, "--help"], terminal_width=200).output
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    result = runner.invoke(app, ["scan", str(model), "--data", "digits", "--out", str(tmp_path / "s"),
                                 "--precision", "half"])
    assert result.exit_code != 0 and "--precision 'half': choose one of" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["scan", str(model), "--data", "digits", "--out", str(tmp_path / "s"),
                                 "--precision", "bfloat16", "--labels", "0,1", "--steps", "3",
                                 "--clean-samples", "40"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "image passes in bfloat16" in result.output



def test_native_bfloat16_is_cpu_only():
    from trojanscan.devices import native_bfloat16
    assert native_bfloat16(torch.device("cuda")) is False and native_bfloat16(torch.device("mps")) is False
