"""The command line: train → evaluate on digits, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trojanscan.cli import app

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "trojanscan.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    model = out / "badnets.safetensors"
    result = runner.invoke(app, ["train", "--data", "digits", "--arch", "mnist-cnn", "--epochs",
                                 "12", "--batch-size", "64", "--attack", "badnets", "--target", "0",
                                 "--trigger-size", "3", "--poison-rate", "0.1", "--out",
                                 str(model), "--json", str(out / "train.json")])
    assert result.exit_code == 0, result.output
    return out, model


def test_train_writes_model_trigger_and_result(trained):
    out, model = trained
    record = json.loads((out / "train.json").read_text())
    assert model.is_file() and (out / "badnets.trigger.npz").is_file()
    assert record["clean_accuracy"] > 0.85 and record["attack_success_rate"] > 0.85
    assert record["trigger"]["target"] == 0 and record["trigger"]["size"] == 3
    assert record["poisoned_count"] == 144 and record["seed"] == 0
    assert len(record["data"]["sha256"]) == 64 and record["parameters"]["arch"] == "mnist-cnn"
    assert len(record["seconds_per_epoch"]) == 12


def test_evaluate_finds_the_saved_trigger_and_agrees_with_train(trained):
    out, model = trained
    result = runner.invoke(app, ["evaluate", str(model), "--data", "digits", "--json",
                                 str(out / "eval.json")])
    assert result.exit_code == 0, result.output
    ev = json.loads((out / "eval.json").read_text())
    tr = json.loads((out / "train.json").read_text())
    assert ev["clean_accuracy"] == pytest.approx(tr["clean_accuracy"])
    assert ev["attack_success_rate"] == pytest.approx(tr["attack_success_rate"])


def test_clean_training_has_null_asr(tmp_path):
    result = runner.invoke(app, ["train", "--data", "digits", "--epochs", "1", "--out",
                                 str(tmp_path / "clean.pt"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["attack_success_rate"] is None and record["trigger"] is None


def _bad_npz(path, **overrides):
    arrays = {"x_train": np.zeros((20, 16, 16, 1), np.uint8), "y_train": np.arange(20) % 10,
              "x_test": np.zeros((10, 16, 16, 1), np.uint8), "y_test": np.arange(10) % 10}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return str(path)


def test_bad_inputs_exit_nonzero_with_one_line_and_no_traceback(trained, tmp_path):
    out, model = trained
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    three_classes = _bad_npz(tmp_path / "three.npz", y_train=np.arange(20) % 3,
                             y_test=np.arange(10) % 3)
    cases = [
        (["evaluate", str(tmp_path / "nope.pt"), "--data", "digits"], "no such model file"),
        (["evaluate", str(junk), "--data", "digits"], "not a model file"),
        (["evaluate", str(model), "--data", str(tmp_path / "nope.npz")], "nope.npz"),
        (["evaluate", str(model), "--data", three_classes], "3 classes"),
        (["train", "--data", "digits", "--arch", "vgg99", "--out", str(tmp_path / "m.pt")],
         "unknown architecture"),
        (["train", "--data", "digits", "--attack", "badnets", "--target", "12", "--out",
          str(tmp_path / "m.pt")], "outside the data's labels"),
        (["train", "--data", _bad_npz(tmp_path / "lab.npz", y_train=np.arange(20) + 5),
          "--out", str(tmp_path / "m.pt")], "lab.npz"),
    ]
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_trigger_for_other_images_is_refused(trained, tmp_path):
    from trojanscan import BadNets

    _, model = trained
    BadNets(size=3).make_trigger((3, 32, 32)).save(tmp_path / "rgb.trigger.npz")
    proc = run_cli("evaluate", str(model), "--data", "digits", "--trigger",
                   str(tmp_path / "rgb.trigger.npz"))
    assert proc.returncode == 2 and "trigger is for images" in proc.stderr


def test_scan_command_writes_verdict_triggers_and_report(trained, tmp_path):
    _, model = trained
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", str(model), "--data", "digits", "--clean-samples", "200",
                                 "--steps", "60", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scan.json").read_text())
    assert record["infected"] is True and 0 in record["flagged_labels"]
    assert record["anomaly_index"] > 2 and record["image_passes"] > 0
    assert {"label", "l1_norm", "anomaly_index", "attack_success_rate", "converged", "steps",
            "seconds"} <= set(record["labels"][0])
    assert record["ground_truth"]["target_flagged"] is True
    assert (out / "report.html").is_file() and (out / "triggers" / "label_000_mask.png").is_file()
    assert "BACKDOOR DETECTED" in result.output


def test_scan_repeats_averages_seeds(trained, tmp_path):
    _, model = trained
    out = tmp_path / "rep"
    result = runner.invoke(app, ["scan", str(model), "--data", "digits", "--clean-samples", "200",
                                 "--steps", "60", "--repeats", "2", "--seed", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "repeats.json").read_text())
    assert record["repeats"] == 2 and record["spread"]["seeds"] == [5, 6]
    runs = [json.loads((out / f"seed-{s}" / "scan.json").read_text()) for s in (5, 6)]
    mean0 = np.mean([next(r["l1_norm"] for r in run["labels"] if r["label"] == 0) for run in runs])
    assert record["labels"][0]["mean_l1"] == pytest.approx(mean0)
    assert record["infected"] is True and record["flagged_labels"][0] == 0
    assert "BACKDOOR DETECTED" in result.output and "seed 6: anomaly index" in result.output
    page = (out / "report.html").read_text()  # the combined page links every run's report
    assert "BACKDOOR DETECTED" in page and 'href="seed-5/report.html"' in page and "seed 6" in page
    # two labels: no outlier test in any run, so no combined verdict either, and no crash
    result = runner.invoke(app, ["scan", str(model), "--data", "digits", "--clean-samples", "200",
                                 "--steps", "20", "--repeats", "2", "--labels", "1,2",
                                 "--out", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    assert "fewer than 3 labels" in result.output
    assert json.loads((tmp_path / "two" / "repeats.json").read_text())["flagged_labels"] == []
    assert "No verdict" in (tmp_path / "two" / "report.html").read_text()


def test_scan_refuses_bad_options_in_one_line(trained, tmp_path):
    _, model = trained
    for args, needle in [
        (["--labels", "0,x"], "--labels"),
        (["--labels", "0,42"], "within 0..9"),
        (["--mean", "0.5"], "--mean and --std go together"),
        (["--schedule", "fastest"], "unknown schedule"),
        (["--clean-samples", "5"], "at least 20 clean images"),
    ]:
        proc = run_cli("scan", str(model), "--data", "digits", "--out", str(tmp_path / "s"), *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)


def test_strip_calibrate_check_and_evaluate(trained, tmp_path):
    out, model = trained
    cal = tmp_path / "strip.npz"
    r = runner.invoke(app, ["strip", "calibrate", str(model), "--data", "digits", "--n", "10",
                            "--samples", "200", "--out", str(cal)])
    assert r.exit_code == 0, r.output
    from trojanscan import Trigger, load_dataset

    data = load_dataset("digits")
    x = data.x_test[data.y_test != 0][:40]
    imgs = torch.cat([x, Trigger.load(out / "badnets.trigger.npz").apply(x)])
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=(imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    r = runner.invoke(app, ["strip", "check", str(model), "--calibration", str(cal), "--inputs",
                            str(inputs), "--json", str(tmp_path / "check.json")])
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["count"] == 80 and len(check["results"]) == 80
    flagged = [r["trojaned"] for r in check["results"]]
    assert sum(flagged[40:]) > 30 > sum(flagged[:40]), "stamped inputs flagged, clean ones mostly not"
    early = [r for r in check["results"] if r["copies"] < 10]
    assert early and all(("entropy_at_least" in r) != r["trojaned"] for r in early)
    r = runner.invoke(app, ["strip", "check", str(model), "--calibration", str(cal), "--inputs",
                            str(inputs), "--full-entropy", "--eager", "--json", str(tmp_path / "full.json")])
    assert r.exit_code == 0, r.output
    full = json.loads((tmp_path / "full.json").read_text())
    assert check["accelerated"] is True and full["accelerated"] is False  # the model as it is
    assert [r["trojaned"] for r in full["results"]] == flagged
    assert all(r["copies"] == 10 and "entropy" in r for r in full["results"])
    r = runner.invoke(app, ["strip", "evaluate", str(model), "--data", "digits", "--n", "20",
                            "--samples", "150", "--temperature", "auto", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "strip.json").read_text())
    assert ev["far"] < 0.3 and ev["frr"] < 0.1, ev
    assert {"n10", "n100"} <= set(ev["throughput"]) and (tmp_path / "ev" / "report.html").is_file()
    assert ev["temperature"] == "auto" and ev["temperature_used"] > 0
    assert ev["throughput"]["n20"]["guarded_trojaned_inputs_per_second"] > 0
    assert f"→ {tmp_path / 'ev' / 'strip.json'}, {tmp_path / 'ev' / 'report.html'}" in r.stdout
    proc = run_cli("strip", "check", str(model), "--calibration", str(inputs), "--inputs", str(inputs))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_demo_plants_finds_and_repairs(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "BACKDOOR DETECTED" in proc.stdout and "target label(s) 0" in proc.stdout
    repaired = json.loads((tmp_path / "demo" / "repair.json").read_text())
    assert repaired["before"]["real_asr"] > 0.9 and repaired["after"]["real_asr"] < 0.2
    assert (tmp_path / "demo" / "repaired.safetensors").is_file()
    assert "Mitigation" in (tmp_path / "demo" / "scan" / "report.html").read_text()
    for name in ("model.safetensors", "model.trigger.npz", "train.json", "scan/report.html", "scan/scan.json",
                 "repaired.safetensors", "repair.json"):  # every file the demo wrote, named at the end
        assert f"{tmp_path / 'demo' / name} — " in proc.stdout
