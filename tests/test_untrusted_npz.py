"""Side files from strangers (triggers, STRIP calibrations, filters, label files, inputs, datasets):
an ``.npz`` holding a pickled object array must be refused in one line without running it."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trojanscan.cli import app
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.scan_result import load_label
from trojanscan.defenses.strip import Strip
from trojanscan.errors import TrojanscanError
from trojanscan.models import save_model

runner = CliRunner()


class Payload:
    """Unpickling it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_npz(path: Path, marker: Path, names: tuple[str, ...], protocol: int = 2) -> Path:
    """An .npz whose members are all object arrays holding the payload."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            member = io.BytesIO()
            array = np.array([Payload(str(marker))], dtype=object)
            np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
            pickle.dump(array, member, protocol=protocol)  # numpy itself would always use protocol 4
            z.writestr(f"{name}.npy", member.getvalue())
    path.write_bytes(buf.getvalue())
    return path


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = pickled_npz(tmp_path / "p.npz", marker, ("x",))
    with np.load(path, allow_pickle=True) as z:
        z["x"]
    assert marker.exists()  # so the refusals below are tested against a live payload


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_npz_reader_refuses_pickled_members(trojaned_digits, tmp_path, protocol):
    marker = tmp_path / "pwned"
    model = trojaned_digits.model
    readers = {
        "trigger": (("mask", "pattern", "target"), Trigger.load),
        "strip": (("format_version", "overlays", "overlays_sha256", "entropy_mean", "entropy_std",
                   "boundary_value", "boundary", "n", "blend", "alpha", "seed", "frr", "n_calibration",
                   "calibration_sha256", "model_sha256"), lambda p: Strip.load(p, model)),
        "filter": (("format_version", "layer", "side", "neurons", "threshold", "fpr", "top_fraction",
                    "units", "model_sha256"), lambda p: InputFilter.load(p, model)),
    }
    for name, (fields, read) in readers.items():
        path = pickled_npz(tmp_path / f"{name}.npz", marker, fields, protocol)
        with pytest.raises(TrojanscanError) as e:
            read(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), name
    label = pickled_npz(tmp_path / "label.npz", marker, ("record", "mask", "pattern"), protocol)
    assert load_label(label) is None  # a damaged resume file: the label is searched again
    assert not marker.exists()


def test_commands_refuse_pickled_npz_side_files(trojaned_digits, tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    data = pickled_npz(tmp_path / "data.npz", marker, ("x_train", "y_train", "x_test", "y_test"))
    inputs = pickled_npz(tmp_path / "inputs.npz", marker, ("x",))
    calibration = pickled_npz(tmp_path / "cal.npz", marker, ("overlays", "n"))
    trigger = pickled_npz(tmp_path / "t.npz", marker, ("mask", "pattern", "target"))
    commands = [
        ["evaluate", str(model), "--data", str(data)],
        ["evaluate", str(model), "--data", "digits", "--trigger", str(trigger)],
        ["strip", "check", str(model), "--calibration", str(calibration), "--inputs", str(inputs)],
        ["filter-check", str(model), "--filter", str(calibration), "--inputs", str(inputs)],
        ["scan", str(model), "--data", str(data), "--out", str(tmp_path / "s")],
    ]
    cwd = os.getcwd()
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, args
    assert os.getcwd() == cwd and not marker.exists()
    assert torch.is_tensor(trojaned_digits.trigger.mask)  # the fixture is untouched
