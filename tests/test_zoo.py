"""The model-zoo benchmark: ROC scores on hand-made cases, a deterministic zoo specification, the
summary's rates, and a tiny digits zoo that resumes after an interruption and reuses its cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import trojanscan.bench.zoo as zoo
import trojanscan.bench.zoo_scores as zoo_scores
import trojanscan.bench.zoo_spec as zoo_spec
import trojanscan.defenses.scan as scan_module
from trojanscan.cli import app
from trojanscan.defenses.outliers import mad_anomaly_index, size_ratio
from trojanscan.defenses.repeats import combine_runs
from trojanscan.defenses.scan_result import LabelResult, ScanResult
from trojanscan.defenses.strip import TEMPERATURE_GRID
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import roc_auc, roc_curve
from trojanscan.models import load_model


def test_roc_auc_on_hand_made_scores():
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # all tied
    # positives 0.9, 0.8, 0.6 against negatives 0.7, 0.55, 0.54: 8 of 9 pairs ordered right
    assert roc_auc([0.9, 0.8, 0.7, 0.6, 0.55, 0.54], [1, 1, 0, 1, 0, 0]) == pytest.approx(8 / 9)
    assert roc_auc([float("inf"), 5.0], [1, 0]) == 1.0  # a MAD of zero gives an infinite index
    assert np.isnan(roc_auc([1.0, 2.0], [1, 1]))
    with pytest.raises(ValueError):
        roc_auc([float("nan"), 1.0], [1, 0])
    with pytest.raises(ValueError):
        roc_auc([1.0, 2.0, 3.0], [1, 0])


def test_roc_auc_matches_sklearn_and_curve_area():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 8, 60).astype(float)  # many ties
    classes = rng.random(60) < 0.4
    assert roc_auc(scores, classes) == pytest.approx(roc_auc_score(classes, scores))
    fpr, tpr, thresholds = roc_curve(scores, classes)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert all(np.diff(fpr) >= 0) and all(np.diff(tpr) >= 0) and np.isnan(thresholds[0])
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(roc_auc(scores, classes))


SHAPES = {"mnist": ((1, 28, 28), 10), "gtsrb": ((3, 32, 32), 43)}


def test_zoo_specification_is_deterministic_balanced_and_buildable():
    a = [e.spec() for e in zoo.make_zoo(SHAPES, 24, seed=3)]
    assert a == [e.spec() for e in zoo.make_zoo(SHAPES, 24, seed=3)]
    assert a != [e.spec() for e in zoo.make_zoo(SHAPES, 24, seed=4)]
    for source in SHAPES:
        mine = [e for e in a if e["dataset"] == source]
        assert len(mine) == 12 and sum(e["attack"] is not None for e in mine) == 6
    kinds, targets = set(), set()
    for seed in range(10):  # every drawn attack builds a trigger that fits its images
        for e in zoo.make_zoo(SHAPES, 24, seed=seed):
            if e.trojaned:
                shape, classes = SHAPES[e.dataset]
                trigger = zoo.attack_for(e).make_trigger(shape)
                assert 0 <= trigger.target < classes and 0.05 <= e.attack_options["poison_rate"] <= 0.15
                kinds.add(e.attack)
                targets.add(trigger.target)
    assert kinds == {"badnets", "blend"} and len(targets) > 10
    entries = zoo.make_zoo(SHAPES, 24, seed=3)
    keys = {e.key("sha") for e in entries}
    assert len(keys) == 24 and entries[5].key("sha") != entries[5].key("other data")
    with pytest.raises(TrojanscanError, match="at least 2"):
        zoo.make_zoo(SHAPES, 1)


def _model(name, trojaned, target, ai, flagged, predicted, iou=None, asr=1.0, kind="patch",
           ratio=0.5):
    row = {"anomaly_index": ai, "size_ratio": ratio, "infected": bool(flagged), "flagged_labels": flagged,
           "predicted_target": predicted, "iou": iou, "seconds": 2.0}
    return {"name": name, "trojaned": trojaned, "target": target, "trigger_kind": kind,
            "attack_success_rate": asr if trojaned else None,
            "scans": {"neural-cleanse": {"runs": [row], "combined": None}}}


def test_summary_rates_on_hand_made_results():
    models = [_model("t1", True, 3, 4.0, [3], 3, iou=0.5, ratio=0.1),
              _model("t2", True, 1, 1.5, [], 7, iou=0.1, ratio=0.3),
              _model("t3", True, 2, 3.0, [2], 2, kind="blend", iou=1.0, ratio=0.45),
              _model("failed", True, 5, 0.5, [], 0, asr=0.2, ratio=0.9),
              _model("c1", False, None, 2.5, [4], 4, ratio=0.6),
              _model("c2", False, None, 1.0, [], 6, ratio=0.8)]
    s = zoo.summarise(models, "neural-cleanse")
    assert (s["models"], s["trojaned"], s["clean"]) == (5, 3, 2)  # the failed attack is left out
    assert s["detection_rate"] == pytest.approx(2 / 3) and s["false_positive_rate"] == 0.5
    assert s["target_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_iou_patch"] == pytest.approx(0.3)  # the blend's IoU is not a patch overlap
    assert s["missed"] == ["t2"] and s["false_positives"] == ["c1"] and s["wrong_target"] == ["t2"]
    assert s["auroc"] == pytest.approx(roc_auc([4.0, 1.5, 3.0, 2.5, 1.0], [1, 1, 1, 0, 0]))
    r = zoo.summarise(models, "neural-cleanse", score="size_ratio")  # flagged below 0.4
    assert r["auroc"] == 1.0 and r["detection_rate"] == pytest.approx(2 / 3)
    assert r["false_positive_rate"] == 0.0 and r["missed"] == ["t3"]
    assert r["detected_with_target"] == pytest.approx(1 / 3)  # t2's smallest trigger is label 7


def test_size_ratio_on_hand_made_norms():
    assert size_ratio([10.0, 50.0, 60.0, 70.0]) == pytest.approx(10 / 55)
    assert size_ratio([5.0, 5.0, 5.0]) == 1.0
    assert np.isnan(size_ratio([])) and np.isnan(size_ratio([0.0, 0.0, 1.0]))
    assert np.isnan(size_ratio([1.0, float("nan")]))
    # a wide spread above the median hides a small trigger from the MAD index, not from the ratio
    norms = [4.7, 28.4, 53.0, 62.6, 63.0, 68.6, 86.3, 95.6, 118.7, 155.2]
    assert mad_anomaly_index(norms).model_anomaly_index < 2 and size_ratio(norms) < 0.1


TINY = dict(datasets=["digits"], size=4, epochs=15, steps=60, clean_samples=300, strip_n=10,
            strip_samples=100)


def test_tiny_zoo_resumes_after_interruption_and_reuses_its_cache(tmp_path, monkeypatch):
    real_train = zoo.train_classifier
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(zoo, "train_classifier", interrupted)
    opts = zoo.ZooOptions(**TINY, methods=["neural-cleanse", "strip"], repeats=2)
    with pytest.raises(KeyboardInterrupt):
        zoo.run_zoo(tmp_path, opts, log=lambda line: None)
    assert len(list((tmp_path / "models").glob("*.json"))) == 1  # the first model is finished

    calls.clear()
    monkeypatch.setattr(zoo, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    results = zoo.run_zoo(tmp_path, opts, log=lambda line: None)
    assert len(calls) == 3  # the finished model was not trained again
    assert [m["cached"] for m in results["models"]] == [True, False, False, False]
    summary = results["summary"]["neural-cleanse / anomaly_index"]
    assert 0.0 <= summary["single_seed"]["auroc"] <= 1.0 and len(summary["per_seed"]) == 2
    assert summary["combined"]["models"] == summary["single_seed"]["models"]
    assert results["summary"]["neural-cleanse / size_ratio"]["single_seed"]["score"] == "size_ratio"
    for name in ("results.json", "summary.md", "report.html", "roc.png"):
        assert (tmp_path / name).is_file()
    assert "AUROC" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == json.loads(
        json.dumps(results["summary"]))

    # the seed-averaged verdict is the MAD test on the runs' mean norms
    model = results["models"][1]
    runs = [ScanResult.load(next((tmp_path / "scans" / model["key"]).glob(f"neural-cleanse-seed{s}-*")))
            for s in (0, 1)]
    means = [np.mean([r.label(k).l1_norm for r in runs]) for k in range(10)]
    report = mad_anomaly_index(means)
    combined = model["scans"]["neural-cleanse"]["combined"]
    assert combined["anomaly_index"] == pytest.approx(report.model_anomaly_index)
    assert combined["flagged_labels"] == report.flagged

    # everything cached: no training, no trigger search, no STRIP measurement
    real_search, real_strip = scan_module.search_triggers, zoo.strip_rates
    def no_search(model, x, labels, *a, **k):
        pytest.fail(f"searched labels {labels} again")

    monkeypatch.setattr(scan_module, "search_triggers", no_search)
    monkeypatch.setattr(zoo, "strip_rates", lambda *a, **k: pytest.fail("measured STRIP again"))
    calls.clear()
    again = zoo.run_zoo(tmp_path, opts, log=lambda line: None)
    assert calls == [] and _without_seconds(again["summary"]) == _without_seconds(results["summary"])
    assert again["complete"] is True

    # a damaged model file is trained again; a STRIP result of other weights is measured again
    (tmp_path / "models" / f"{model['key']}.safetensors").write_bytes(b"not a model")
    strip_file = next((tmp_path / "scans" / model["key"]).glob("strip-seed0-*.json"))
    strip_file.write_text(strip_file.read_text().replace(model["model_sha256"], "0" * 64))
    measured, searched = [], []
    monkeypatch.setattr(zoo, "strip_rates", lambda *a, **k: measured.append(1) or real_strip(*a, **k))
    monkeypatch.setattr(scan_module, "search_triggers",
                        lambda m, x, labels, *a, **k: searched.extend(labels)
                        or real_search(m, x, labels, *a, **k))
    zoo.run_zoo(tmp_path, opts, log=lambda line: None)
    assert calls == [1] and measured == [1]
    # other scan settings are not served from the cache
    zoo.run_zoo(tmp_path, zoo.ZooOptions(**{**TINY, "clean_samples": 200}, methods=["neural-cleanse"]),
                log=lambda line: None)
    assert searched
    # other STRIP settings are measured afresh and recorded with the result
    measured.clear()
    tuned = zoo.run_zoo(tmp_path, zoo.ZooOptions(**TINY, methods=["strip"], strip_temperature="auto",
                                                 strip_boundary="quantile"), log=lambda line: None)
    assert measured == [1] * 4
    rows = [m["strip"] for m in tuned["models"]]
    assert {(r["temperature_request"], r["boundary_method"]) for r in rows} == {("auto", "quantile")}
    assert all(r["temperature"] in TEMPERATURE_GRID for r in rows)


def _without_seconds(summary):
    """A resumed scan adds its few seconds of reloading to the recorded time."""
    return json.loads(json.dumps(summary).replace("mean_scan_seconds", "x"), object_hook=lambda d: {
        k: v for k, v in d.items() if k != "x"})


def test_bench_zoo_command_refuses_bad_options_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "zoo", "--data", "digits", "--methods", "magic",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown zoo method" in result.output
    result = runner.invoke(app, ["bench", "zoo", "--data", "digits", "--size", "1",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--size must be >= 2" in result.output
    for option, value, message in (("--strip-boundary", "median", "unknown STRIP boundary"),
                                   ("--strip-temperature", "-2", "temperature must be a positive")):
        result = runner.invoke(app, ["bench", "zoo", "--data", "digits", option, value,
                                     "--out", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_attack_drawn_for_small_images_fits():
    for e in zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 40, seed=1):
        if e.trojaned:
            trigger = zoo.attack_for(e).make_trigger((1, 8, 8))
            assert trigger.mask.shape == (8, 8) and trigger.mask.sum() > 0


def _fake_scan(norms, seed=0, index=None):
    labels = [LabelResult(k, n, 1.0, True, 1, 1, 1.0, "done", 0.0, torch.zeros(2, 2),
                          torch.zeros(1, 2, 2)) for k, n in enumerate(norms)]
    report = mad_anomaly_index(norms) if len(norms) >= 3 else None
    return ScanResult("neural-cleanse", labels, [], False,
                      index if index is not None else (report.model_anomaly_index if report else
                                                       float("nan")),
                      2.0, 0.0, 0.0, {}, seed, "m", "d", 1.0, "unit")


def test_combined_runs_survive_infinite_and_missing_indices():
    # equal norms but one: a MAD of zero gives an infinite index in both runs
    flat = [10.0, 10.0, 10.0, 2.0]
    combined = combine_runs([_fake_scan(flat, 0), _fake_scan(flat, 1)])
    assert combined.anomaly_index == float("inf") and combined.flagged_labels == [3]
    spread = combined.spread()
    assert spread["anomaly_index"] == [float("inf")] * 2 and np.isnan(spread["mean"])
    assert combined.size_ratio == pytest.approx(0.2)
    # fewer than 3 labels: no outlier test and no verdict, as for a single scan
    few = combine_runs([_fake_scan([3.0, 9.0], 0), _fake_scan([5.0, 9.0], 1)])
    assert few.flagged_labels == [] and np.isnan(few.anomaly_index) and few.mean_l1 == [4.0, 9.0]
    assert np.isnan(few.spread()["std"])
    json.dumps(few.to_dict(), default=str)
    # the zoo's row keeps the infinite index even where the stored one was lost (JSON null → NaN)
    row = zoo_scores.scan_row(_fake_scan(flat, index=float("nan")))
    assert row["anomaly_index"] == float("inf")
    assert zoo_scores.verdict(row, "anomaly_index")[0] == float("inf")


def test_world_zoo_draws_the_further_attack_kinds_on_request(tmp_path):
    kinds = zoo_spec.MORE_ATTACKS
    entries = zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 2 * len(kinds), seed=2, preset="world",
                           attacks=kinds)
    drawn = {e.attack for e in entries if e.trojaned}
    assert drawn == {"pattern", "sig", "label-consistent", "tbt"}
    for e in entries:  # each builds, with the options the zoo drew
        if e.trojaned:
            assert zoo.attack_for(e).name == e.attack
    assert [e.spec() for e in zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 20, seed=2, preset="world")] == [
        e.spec() for e in zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 20, seed=2, preset="world",
                                       attacks=zoo_spec.WORLD_ATTACKS)]  # the default ten, unchanged
    with pytest.raises(TrojanscanError, match="world preset"):
        zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 4, attacks=("tbt",))
    with pytest.raises(TrojanscanError, match="unknown: magic"):
        zoo.make_zoo({"digits": ((1, 8, 8), 10)}, 4, preset="world", attacks=("magic",))


def test_world_zoo_turns_through_the_architectures_asked_for():
    shapes = {"digits": ((1, 8, 8), 10)}
    entries = zoo.make_zoo(shapes, 12, seed=2, preset="world", archs=("mlp", "cnn"))
    assert [e.arch for e in entries] == ["mlp", "mlp", None, None] * 3  # a clean/trojaned pair shares one
    assert [e.spec() for e in zoo.make_zoo(shapes, 16, seed=2, preset="world")] == [
        e.spec() for e in zoo.make_zoo(shapes, 16, seed=2, preset="world",
                                       archs=("cnn", "mlp", "resnet-small", "mobilenet-small"))]
    with pytest.raises(TrojanscanError, match="unknown: vgg"):
        zoo.make_zoo(shapes, 4, preset="world", archs=("vgg",))
    with pytest.raises(TrojanscanError, match="world preset"):
        zoo.make_zoo(shapes, 4, archs=("mlp",))


def test_a_tbt_zoo_entry_is_a_clean_model_attacked_afterwards(tmp_path, digits):
    entry = zoo.ZooEntry(1, "digits", 5, 10, attack="tbt",
                         attack_options={"target": 1, "wb": 20, "position": "center", "trigger_steps": 10,
                                         "insert_steps": 30})
    record = zoo.train_entry(entry, digits, tmp_path)
    assert record["trojaned"] and record["target"] == 1 and record["attack_success_rate"] is not None
    loaded = load_model(tmp_path / record["model_file"])
    assert loaded.metadata["quantisation"]["scheme"] == "int8-symmetric-per-tensor"
    assert zoo.train_entry(entry, digits, tmp_path)["cached"]


def test_a_tiny_zoo_runs_an_evidence_inspector_end_to_end_and_caches_it(tmp_path, monkeypatch):
    lines: list[str] = []
    opts = zoo.ZooOptions(**TINY, methods=["mm-bd"])
    results = zoo.run_zoo(tmp_path, opts, log=lines.append)
    for m in results["models"]:
        saved = list((tmp_path / "scans" / m["key"]).glob("mm-bd-seed*.json"))
        assert len(saved) == 1
        record = json.loads(saved[0].read_text())
        evidence = record["evidence"]
        assert 0.0 <= evidence["p_value"] <= 1.0 and len(evidence["statistics"]) == 10
        assert record["model_sha256"] == m["model_sha256"]
    assert sum("mm-bd: p" in line for line in lines) == len(results["models"])
    # a second run reads the evidence back instead of searching again
    monkeypatch.setattr(zoo.INSPECTORS["mm-bd"], "inspect", lambda *a, **k: pytest.fail("MM-BD ran again"))
    again = zoo.run_zoo(tmp_path, opts, log=lambda line: None)
    assert [m["key"] for m in again["models"]] == [m["key"] for m in results["models"]]
