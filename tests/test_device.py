"""--device: auto resolves to what the machine has, an absent device falls back to the CPU with one
line, every model-running workflow and command takes it, and the device boundary (inputs to the
model's device, outputs back to the CPU) leaves results unchanged."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from typer.testing import CliRunner

from trojanscan import api, scan
from trojanscan.cli import app
from trojanscan.devices import boundary, place, resolve_device, unplace
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.models import build_model, save_model
from trojanscan.workflows import inputs

runner = CliRunner()


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_and_auto_resolve_to_the_cpu_here(no_accelerator):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither warns
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_an_absent_device_falls_back_to_the_cpu_with_a_message(no_accelerator, name):
    pattern = rf"--device {name}: no \w+ device on this machine .*running on the CPU"
    with pytest.warns(TrojanscanWarning, match=pattern):
        assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "mps:1", ""])
def test_unknown_devices_are_one_line_errors(name):
    if name == "":
        assert resolve_device(name) == torch.device("cpu")
        return
    with pytest.raises(TrojanscanError, match="choose one of auto, cpu, cuda, mps"):
        resolve_device(name)


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"


WORKFLOWS = ["scan", "repair", "build_filter", "attack_model", "evaluate_file", "train_classifier",
             "train_and_save", "strip_calibrate", "strip_check", "strip_evaluate", "guard_calibrate",
             "guard_check", "guard_evaluate", "filter_check"]
COMMANDS = [["scan"], ["repair"], ["filter"], ["filter-check"], ["attack"], ["evaluate"], ["train"], ["demo"],
            ["strip", "calibrate"], ["strip", "check"], ["strip", "evaluate"], ["guard", "calibrate"],
            ["guard", "check"], ["guard", "evaluate"], ["bench", "zoo"]]


def test_every_model_running_workflow_and_command_takes_a_device():
    for name in WORKFLOWS:
        parameter = inspect.signature(getattr(api, name)).parameters.get("device")
        assert parameter is not None and parameter.default == "cpu", name
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert "--device" in result.output, command


def test_cli_falls_back_in_one_line(no_accelerator, trojaned_digits, digits, tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    result = runner.invoke(app, ["evaluate", str(model), "--data", "digits", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "warning: --device cuda: no cuda device on this machine" in result.output
    assert "running on the CPU" in result.output


def test_the_device_boundary_changes_no_result(trojaned_digits, digits, monkeypatch, tmp_path):
    """What a device run does besides moving tensors: the hooks at the model's boundary. Forced on
    the CPU, the scan and a repair give the default run's numbers, and the repaired model comes
    back without hooks."""
    options = dict(clean_samples=60, steps=8, labels=[0, 1, 2], progress=False, precision="float32")
    plain = scan(trojaned_digits.model, digits, **options)
    monkeypatch.setattr(inputs, "place", lambda model, device, precision: boundary(copy.deepcopy(model)))
    hooked = scan(trojaned_digits.model, digits, device="auto", **options)
    assert [r.l1_norm for r in hooked.labels] == pytest.approx([r.l1_norm for r in plain.labels], rel=1e-6)
    record = api.repair(trojaned_digits.model, hooked, digits, method="unlearn", fraction=0.05, epochs=1,
                        publish=False, progress=False)
    assert not record.model._forward_hooks and not record.model._forward_pre_hooks
    assert not trojaned_digits.model._forward_hooks  # the boundary hooks went with the copy


def test_place_on_cpu_is_a_no_op_and_unplace_undoes_the_boundary():
    model = build_model("mlp", 3, (1, 4, 4))
    assert place(model, "cpu") is model and not model._forward_pre_hooks
    hooked = boundary(model)
    assert hooked(torch.rand(2, 1, 4, 4)).device.type == "cpu"
    assert len(hooked._forward_pre_hooks) == 1 and boundary(hooked) is hooked  # hooked once
    assert not unplace(hooked)._forward_pre_hooks
