"""The model-zoo benchmark: a seeded zoo of clean and trojaned models, each trained once and cached
by content, scanned by the chosen methods and scored as the field scores detectors (AUROC of the
anomaly index, detection and false-positive rates, target-label accuracy, trigger IoU, seconds).

Layout of the output folder (rerun the same command to resume an interrupted run)::

    models/KEY.safetensors, KEY.trigger.npz, KEY.json   trained models, ground truth, train record
    scans/KEY/METHOD-seedS-TAG/                         every scan (resumable, with its report;
                                                        TAG: a hash of the scan settings)
    results.json, summary.md, report.html, roc.png      the measurements and their summary
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trojanscan.attacks.blend import PATTERNS
from trojanscan.bench.zoo_scores import SCORES, attack_took, mean_finite, scan_row, summarise, summarise_strip
from trojanscan.data import Dataset, load_dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.defenses.neural_cleanse import SCHEDULES
from trojanscan.defenses.registry import REVERSERS
from trojanscan.defenses.repeats import combine_runs
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.strip import BOUNDARY_METHODS, Strip, parse_temperature
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import sha256_file, write_json
from trojanscan.models import load_model, save_model
from trojanscan.report.zoo_html import write_zoo_report
from trojanscan.runners import ScanJob, run_jobs
from trojanscan.validation import check_choice
from trojanscan.workflows.guarding import strip_rates
from trojanscan.workflows.records import environment
from trojanscan.workflows.training import make_attack, train_classifier

ZOO_FORMAT = 1  # part of every cache key: bump when training changes meaning
SCAN_METHODS = tuple(REVERSERS)  # every registered trigger reverser
METHODS = (*SCAN_METHODS, "strip")
DEFAULT_DATASETS = ("mnist", "fashion-mnist")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
PATCH_COLOURS = ("white", "random", "checker")  # black is invisible on MNIST's black background


@dataclass
class ZooEntry:
    """One model of the zoo: its data, training and (for a trojaned one) attack settings."""

    index: int
    dataset: str
    seed: int
    epochs: int
    train_samples: int | None = None
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.index:03d}-{Path(self.dataset).stem}-{self.attack or 'clean'}"

    @property
    def trojaned(self) -> bool:
        return self.attack is not None

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self, data_sha256: str) -> str:
        """Content address: the training settings and the data's hash, not the entry's place."""
        spec = {k: v for k, v in self.spec().items() if k != "index"}
        blob = json.dumps({**spec, "data_sha256": data_sha256, "format": ZOO_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _draw_attack(rng: random.Random, shape: tuple[int, int, int], num_classes: int
                 ) -> tuple[str, dict[str, Any]]:
    """A random BadNets patch (two times in three) or blended trigger for images of ``shape``."""
    _, h, w = shape
    options: dict[str, Any] = {"target": rng.randrange(num_classes),
                               "poison_rate": rng.choice((0.05, 0.1, 0.15))}
    if rng.random() >= 2 / 3:
        return "blend", {**options, "alpha": rng.choice((0.1, 0.15, 0.2)),
                         "pattern": rng.choice(PATTERNS)}
    side = min(h, w)
    lo = max(2, round(0.1 * side))
    size = rng.randint(lo, max(lo, round(0.2 * side)))
    position: str | list[int] = rng.choice((*CORNERS, "anywhere"))
    if position == "anywhere":  # a random place, possibly over the object
        position = [rng.randint(1, h - 1 - size), rng.randint(1, w - 1 - size)]
    return "badnets", {**options, "size": size, "position": position,
                       "color": rng.choice(PATCH_COLOURS)}


def make_zoo(datasets: dict[str, tuple[tuple[int, int, int], int]], size: int, seed: int = 0, *,
             epochs: int = 2, train_samples: int | None = None) -> list[ZooEntry]:
    """A deterministic zoo of ``size`` models: datasets in turn, two at a time, clean then trojaned.

    ``datasets`` maps a data source to its (C, H, W) image shape and class count.
    """
    if size < 2:
        raise TrojanscanError(f"a zoo needs at least 2 models (one clean, one trojaned), got {size}")
    if not datasets:
        raise TrojanscanError("a zoo needs at least one dataset")
    rng = random.Random(seed)
    names = list(datasets)
    entries = []
    for i in range(size):
        source = names[(i // 2) % len(names)]
        entry = ZooEntry(i, source, rng.randrange(2**31), epochs, train_samples)
        if i % 2 == 1:
            entry.attack, entry.attack_options = _draw_attack(rng, *datasets[source])
        entries.append(entry)
    return entries


def _attack_for(entry: ZooEntry) -> Any:
    if entry.attack is None:
        return None
    options = dict(entry.attack_options)
    if isinstance(options.get("position"), list):
        options["position"] = tuple(options["position"])
    return make_attack(entry.attack, seed=entry.seed, **options)


def _cached_model(models_dir: Path, key: str) -> dict[str, Any] | None:
    """The train record of a finished model whose file is intact, else ``None``."""
    record_path, model_path = models_dir / f"{key}.json", models_dir / f"{key}.safetensors"
    if not (record_path.is_file() and model_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None
    if record.get("model_sha256") != sha256_file(model_path):
        return None
    if record.get("trojaned") and not trigger_path_for(model_path).is_file():
        return None
    return record


def train_entry(entry: ZooEntry, data: Dataset, models_dir: Path) -> dict[str, Any]:
    """Train one zoo model (or reuse the cached one) and return its record."""
    key = entry.key(data.sha256)
    cached = _cached_model(models_dir, key)
    if cached is not None:
        return {**cached, "cached": True}
    train = data
    if entry.train_samples is not None and entry.train_samples < len(data.x_train):
        g = torch.Generator().manual_seed(entry.seed)
        idx = torch.randperm(len(data.x_train), generator=g)[:entry.train_samples]
        train = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])
    result = train_classifier(train, epochs=entry.epochs, attack=_attack_for(entry), seed=entry.seed,
                              progress=False)
    model_path = models_dir / f"{key}.safetensors"
    if result.trigger is not None:  # the trigger first: a model file alone is not a finished entry
        result.trigger.save(trigger_path_for(model_path))
    save_model(result.model, model_path, metadata={"data_sha256": data.sha256})
    record = {"name": entry.name, "key": key, "spec": entry.spec(), "trojaned": entry.trojaned,
              "target": result.trigger.target if result.trigger else None,
              "trigger_kind": result.trigger.kind if result.trigger else None,
              "clean_accuracy": result.clean_accuracy,
              "attack_success_rate": result.attack_success_rate,
              "train_seconds": result.seconds, "model_sha256": sha256_file(model_path),
              "data": {"source": entry.dataset, "name": data.name, "sha256": data.sha256}}
    write_json(models_dir / f"{key}.json", record)
    return {**record, "cached": False}


def _tag(options: dict[str, Any]) -> str:
    """A short hash of the settings, so that a cached result is only reused for the same ones."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]


def _strip_row(model_path: Path, model_sha256: str, data: Dataset, out: Path, seed: int, n: int,
               samples: int, temperature: float | str = 1.0, boundary: str = "normal") -> dict[str, Any]:
    if out.is_file():
        try:
            row = json.loads(out.read_text())
            if isinstance(row, dict) and row.get("model_sha256") == model_sha256 and \
                    {"frr", "far", "seconds"} <= set(row):
                return row
        except ValueError:
            pass  # damaged: measure again
    module = load_model(model_path, input_shape=data.input_shape).module
    trigger = Trigger.load(trigger_path_for(model_path)) if trigger_path_for(model_path).is_file() else None
    start = time.perf_counter()
    strip = Strip(module, n=n, frr=0.01, seed=seed, temperature=temperature, boundary=boundary)
    rates = strip_rates(strip, data, trigger, samples=samples, calibration_samples=samples,
                        seed=seed).rates
    row = {"seed": seed, "n": n, "frr": rates["frr"], "far": rates["far"],
           "boundary": strip.boundary_, "boundary_method": boundary, "temperature": strip.temperature_,
           "temperature_request": str(temperature), "seconds": time.perf_counter() - start,
           "model_sha256": model_sha256}
    write_json(out, row)
    return row


@dataclass
class ZooOptions:
    """What to build and how to scan it."""

    datasets: Sequence[str] = DEFAULT_DATASETS
    size: int = 24
    seed: int = 0
    methods: Sequence[str] = ("neural-cleanse",)
    repeats: int = 1
    epochs: int = 2
    train_samples: int | None = None
    clean_samples: int = 1000
    schedule: str = "default"
    steps: int | None = None
    strip_n: int = 100
    strip_samples: int = 500
    strip_temperature: float | str = 1.0
    strip_boundary: str = "normal"

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise TrojanscanError(("no method given" if not self.methods else
                                   f"unknown zoo method(s) {', '.join(unknown)}")
                                  + f"; choose from {', '.join(METHODS)}")
        self.strip_temperature = parse_temperature(self.strip_temperature)
        check_choice("STRIP boundary", self.strip_boundary, BOUNDARY_METHODS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.train_samples is not None and self.train_samples < 10:
            raise TrojanscanError(f"--train-samples must be >= 10, got {self.train_samples}")
        if self.steps is not None and self.steps < 1:
            raise TrojanscanError(f"--steps must be >= 1, got {self.steps}")
        for name, value, low in (("--size", self.size, 2), ("--repeats", self.repeats, 1),
                                 ("--epochs", self.epochs, 1), ("--clean-samples", self.clean_samples, 1),
                                 ("--strip-n", self.strip_n, 2), ("--strip-samples", self.strip_samples, 10)):
            if value < low:
                raise TrojanscanError(f"{name} must be >= {low}, got {value}")


def run_zoo(out_dir: str | Path, options: ZooOptions | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or resume) the zoo in ``out_dir``, scan every model, write ``results.json`` after each
    model and the summary files at the end; returns the results."""
    opts = options or ZooOptions()
    opts.check()
    out = Path(out_dir)
    data = {source: load_dataset(source) for source in opts.datasets}
    shapes = {source: (d.input_shape, d.num_classes) for source, d in data.items()}
    entries = make_zoo(shapes, opts.size, opts.seed, epochs=opts.epochs,
                       train_samples=opts.train_samples)
    scan_options = {"schedule": opts.schedule, "steps": opts.steps,
                    "clean_samples": opts.clean_samples}
    results: dict[str, Any] = {"benchmark": "zoo", "options": dataclasses.asdict(opts),
                               "environment": environment(), "complete": False, "models": []}
    for stale in ("summary.md", "report.html", "roc.png"):  # an earlier run's, maybe other options
        (out / stale).unlink(missing_ok=True)
    start = time.perf_counter()
    for entry in entries:
        dataset = data[entry.dataset]
        record = train_entry(entry, dataset, out / "models")
        model_path = out / "models" / f"{record['key']}.safetensors"
        asr = record["attack_success_rate"]
        log(f"[{entry.index + 1}/{len(entries)}] {entry.name}: CA {record['clean_accuracy']:.4f}"
            + (f" ASR {asr:.4f}" if asr is not None else "")
            + (" (cached)" if record["cached"] else f" trained in {record['train_seconds']:.0f} s"))
        record["scans"] = {}
        for method in (m for m in opts.methods if m in SCAN_METHODS):
            folder = out / "scans" / record["key"]
            # each scan resumes in its folder: labels finished with the same model, data, settings
            # and algorithm version are reused by its fingerprint check, others searched again
            jobs = [ScanJob(str(model_path), entry.dataset,
                            str(folder / f"{method}-seed{s}-{_tag(scan_options)}"), method,
                            {"schedule": opts.schedule, "steps": opts.steps, "seed": s},
                            clean_samples=opts.clean_samples)
                    for s in range(opts.seed, opts.seed + opts.repeats)]
            done = run_jobs(jobs)
            failed = [j.error for j in done if not j.ok]
            if failed:
                raise TrojanscanError(f"{entry.name}: {failed[0]}")
            runs = [ScanResult.load(j.out_dir) for j in jobs]
            rows = [scan_row(r) for r in runs]
            entry_scans: dict[str, Any] = {"runs": rows, "combined": None}
            if len(runs) > 1:
                combined = combine_runs(runs)
                entry_scans["combined"] = {
                    "anomaly_index": combined.anomaly_index, "infected": combined.infected,
                    "size_ratio": combined.size_ratio,
                    "flagged_labels": combined.flagged_labels,
                    "predicted_target": combined.predicted_target, "iou": mean_finite(
                        r["iou"] for r in rows),
                    "seconds": sum(r["seconds"] for r in rows), "spread": combined.spread()}
            record["scans"][method] = entry_scans
            log(f"    {method}: anomaly index " + ", ".join(f"{r['anomaly_index']:.2f}" for r in rows)
                + f"; flagged {rows[0]['flagged_labels']}"
                + (f"; true target {record['target']}" if record["trojaned"] else ""))
        if "strip" in opts.methods:
            settings: dict[str, Any] = {"n": opts.strip_n, "samples": opts.strip_samples}
            if (opts.strip_temperature, opts.strip_boundary) != (1.0, "normal"):  # old caches stay valid
                settings.update(temperature=opts.strip_temperature, boundary=opts.strip_boundary)
            record["strip"] = _strip_row(model_path, record["model_sha256"], dataset,
                                         out / "scans" / record["key"] /
                                         f"strip-seed{opts.seed}-{_tag(settings)}.json", opts.seed,
                                         opts.strip_n, opts.strip_samples, opts.strip_temperature,
                                         opts.strip_boundary)
            log(f"    strip: FRR {record['strip']['frr']:.3f}"
                + (f" FAR {record['strip']['far']:.3f}" if record["trojaned"] else ""))
        results["models"].append(record)
        write_json(out / "results.json", results)
    results["summary"] = {}
    for method in (m for m in opts.methods if m in SCAN_METHODS):
        for score in SCORES:
            summary = {"single_seed": summarise(results["models"], method, score=score)}
            if opts.repeats > 1:
                summary["per_seed"] = [summarise(results["models"], method, f"seed-{k}", score)
                                       for k in range(opts.repeats)]
                summary["combined"] = summarise(results["models"], method, "combined", score)
            results["summary"][f"{method} / {score}"] = summary
        if opts.repeats > 1:  # the mean over models of the runs' standard deviation
            results.setdefault("anomaly_index_spread", {})[method] = statistics.fmean(
                m["scans"][method]["combined"]["spread"]["std"] for m in results["models"])
    if "strip" in opts.methods:
        results["summary"]["strip"] = summarise_strip(results["models"])
    results["failed_attacks"] = [m["name"] for m in results["models"] if not attack_took(m)]
    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", results)
    write_zoo_report(results, out)
    return results
