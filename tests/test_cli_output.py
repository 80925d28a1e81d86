"""What the command line prints: every input layout of strip check / filter-check works or fails in
one line, piped output is clean (no bars, no leading blank lines), --quiet, --version, banners that
say "no verdict" when there is none, and the warnings a repair owes its user."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from trojanscan import InputFilter, save_model
from trojanscan._version import __version__
from trojanscan.cli import app, repair_warnings
from trojanscan.data.triggers import trigger_path_for
from trojanscan.workflows.guarding import strip_calibrate

runner = CliRunner()


def piped(*args: str) -> subprocess.CompletedProcess:
    """The real entry point with stdout and stderr piped, as in a script or CI log."""
    return subprocess.run([sys.executable, "-m", "trojanscan.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(trojaned_digits, digits, tmp_path_factory):
    """A model file with its trigger beside it, a STRIP calibration and an input filter for it, and
    the same 12 test images written in several layouts."""
    out = tmp_path_factory.mktemp("cli-output")
    model = out / "model.safetensors"
    save_model(trojaned_digits.model, model)
    trojaned_digits.trigger.save(trigger_path_for(model))
    strip_calibrate(model, digits, n=10, samples=100, out=out / "strip.npz", progress=False)
    InputFilter(trojaned_digits.model, fpr=0.05).fit(digits.x_train[:300],
                                                     [trojaned_digits.trigger]).save(out / "filter.npz")
    x = digits.x_test[:12]
    u8 = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(out / "nhwc.npz", x=u8)
    np.savez(out / "keyed.npz", a=u8, b=u8)
    np.save(out / "nchw.npy", x.numpy())
    np.save(out / "f255.npy", x.numpy() * 255)
    np.save(out / "ambiguous.npy", np.zeros((2, 3, 16, 3), np.uint8))
    (out / "folder").mkdir()
    from PIL import Image

    for i, a in enumerate(u8):
        Image.fromarray(a[..., 0]).save(out / "folder" / f"{i:02d}.png")
    return out, model


GOOD = [(["nhwc.npz"], "uint8 0–255, NHWC"), (["nchw.npy"], "float32 in [0, 1], NCHW"),
        (["keyed.npz", "--key", "b"], "keyed.npz[b]"), (["f255.npy", "--range", "255"], "float32 0–255"),
        (["folder"], "12 image files"), (["folder/00.png"], "1 image file"),
        (["ambiguous.npy", "--layout", "nchw"], None)]
BAD = [(["keyed.npz"], "name the images' array with --key"), (["f255.npy"], "declare --range 255"),
       (["ambiguous.npy"], "declare it with --layout"), (["missing.npz"], "no such file or folder")]


@pytest.mark.parametrize("command", ["strip", "filter"])
def test_each_input_layout_works_or_fails_in_one_line(setup, command):
    out, model = setup
    head = (["strip", "check", str(model), "--calibration", str(out / "strip.npz")] if command == "strip"
            else ["filter-check", str(model), "--filter", str(out / "filter.npz")])
    for args, needle in GOOD + BAD:
        r = runner.invoke(app, [*head, "--inputs", str(out / args[0]), *args[1:]])
        if (args, needle) in BAD or args[0] == "ambiguous.npy":  # 3×16×3 images: not the model's
            lines = r.stderr.strip().splitlines()
            assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
            assert (needle or "the model expects 1×16×16 images") in lines[0], (args, lines)
        else:
            assert r.exit_code == 0, (args, r.output)
            assert needle in r.stdout and "inputs: " in r.stdout, (args, r.stdout)
            count = 1 if args[0].endswith(".png") else 12
            assert f"of {count} inputs" in r.stdout, r.stdout


def test_piped_output_has_no_bars_and_no_leading_blank_lines(setup, tmp_path):
    out, model = setup
    proc = piped("scan", str(model), "--data", "digits", "--labels", "0,1", "--steps", "20",
                 "--clean-samples", "100", "--out", str(tmp_path / "scan"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].strip() and "\x1b[" not in proc.stdout + proc.stderr
    assert proc.stdout.startswith("No verdict — fewer than 3 labels"), proc.stdout
    assert "No backdoor found" not in proc.stdout and "step " not in proc.stderr
    assert f"→ {tmp_path / 'scan' / 'scan.json'}, {tmp_path / 'scan' / 'report.html'}" in proc.stdout
    page = (tmp_path / "scan" / "report.html").read_text()
    assert "No verdict" in page and "No backdoor found" not in page


def test_quiet_and_version(setup):
    out, model = setup
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"trojanscan {__version__}"
    loud = runner.invoke(app, ["evaluate", str(model), "--data", "digits"])
    quiet = runner.invoke(app, ["evaluate", str(model), "--data", "digits", "--quiet"])
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "using the trigger saved beside the model" in loud.stdout
    assert "using the trigger" not in quiet.stdout and "clean accuracy (CA)" in quiet.stdout
    r = runner.invoke(app, ["strip", "check", str(model), "--calibration", str(out / "strip.npz"),
                            "--inputs", str(out / "nhwc.npz"), "-q"])
    assert r.exit_code == 0 and "inputs: " not in r.stdout and "of 12 inputs flagged" in r.stdout


def _pruning(over_budget: bool) -> dict:
    curve = [{"pruned": 0, "clean_accuracy": 0.95, "reversed_asr": 0.9},
             {"pruned": 40, "clean_accuracy": 0.94, "reversed_asr": 0.2}]
    return {"before": {"clean_accuracy": 0.95, "reversed_asr": 0.9, "real_asr": 0.99},
            "after": {"clean_accuracy": 0.94 if over_budget else 0.86, "reversed_asr": 0.2,
                      "real_asr": 0.06},
            "pruning": {"fraction": 0.078, "reached": False, "asr_threshold": 0.01, "curve": curve,
                        "over_budget": {"pruned": 48, "clean_accuracy": 0.92} if over_budget else None}}


def test_a_repair_says_what_its_table_does_not():
    stopped = repair_warnings(_pruning(over_budget=True), 2.0)
    assert "pruning stopped at 7.8% of the neurons: one more step would cost 3.0 points" in stopped[0]
    assert any("the real trigger still works on 6.0%" in w for w in stopped)
    costly = repair_warnings(_pruning(over_budget=False), 2.0)
    assert any("cost 9.0 points of clean accuracy on the test split (budget 2)" in w for w in costly)
    assert any("did not fall below 1.0%" in w for w in costly)
    fine = {"before": {"clean_accuracy": 0.95}, "after": {"clean_accuracy": 0.95, "real_asr": 0.001,
                                                          "reversed_asr": 0.0}}
    assert repair_warnings(fine, 2.0) == []


def test_help_shows_no_type_beside_a_flag():
    """An on/off flag takes no value, so its help line shows no ``<bool>``; options with values keep
    their type."""
    out = runner.invoke(app, ["scan", "--help"], env={"COLUMNS": "160"}).output
    assert "--quiet" in out and "--trust-model" in out
    assert "<bool>" not in out
    assert "<int>" in out
