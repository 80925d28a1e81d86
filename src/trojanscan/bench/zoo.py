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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trojanscan.attacks import ModelAttack, PoisoningAttack
from trojanscan.bench.zoo_scores import (
    SCORES,
    attack_took,
    mean_finite,
    scan_row,
    summarise,
    summarise_strip,
)
from trojanscan.bench.zoo_spec import (
    DEFAULT_DATASETS,
    PRESETS,
    ZooEntry,
    attack_for,
    make_zoo,
)
from trojanscan.data import Dataset, load_dataset
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.defenses.neural_cleanse import SCHEDULES
from trojanscan.defenses.registry import INSPECTORS, REVERSERS
from trojanscan.defenses.repeats import combine_runs
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.strip import BOUNDARY_METHODS, Strip, parse_temperature
from trojanscan.devices import PRECISIONS, place, resolve_precision
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import read_json, sha256_file, write_json
from trojanscan.models import load_model, save_model
from trojanscan.models.wrappers import ExpectsNormalised, wrap_normalization
from trojanscan.report.zoo_html import evidence_summary, write_zoo_report
from trojanscan.runners import RUNNERS, ScanJob, run_jobs
from trojanscan.validation import check_choice
from trojanscan.workflows.guarding import strip_rates
from trojanscan.workflows.inputs import clean_subset
from trojanscan.workflows.records import environment
from trojanscan.workflows.training import train_classifier

SCAN_METHODS = tuple(REVERSERS)  # every registered trigger reverser
EVIDENCE_METHODS = tuple(INSPECTORS)  # evidence for the verdict (MM-BD, label pairs, the untargeted map)
METHODS = (*SCAN_METHODS, "strip", *EVIDENCE_METHODS)


def model_file(models_dir: Path, record: dict[str, Any]) -> Path:
    """Where a zoo model lives: ``KEY.safetensors``, or ``KEY.pt`` for one that expects normalised inputs."""
    return models_dir / record.get("model_file", f"{record['key']}.safetensors")


def _cached_model(models_dir: Path, key: str) -> dict[str, Any] | None:
    """The train record of a finished model whose file is intact, else ``None``."""
    record_path = models_dir / f"{key}.json"
    if not record_path.is_file():
        return None
    try:  # a damaged or oversized record: train again
        record = read_json(record_path, "zoo model record")
    except TrojanscanError:
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    model_path = model_file(models_dir, record)
    if not model_path.is_file():
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
    attack = attack_for(entry)
    poisoning = attack if isinstance(attack, PoisoningAttack) else None
    result = train_classifier(train, entry.arch, epochs=entry.epochs, attack=poisoning,
                              seed=entry.seed, progress=False)
    int8_steps = None
    if isinstance(attack, ModelAttack):  # TBT: the cleanly trained model, attacked afterwards
        attacked, trigger = attack.apply(result.model, train)
        after = attack.report_["after"]
        result = dataclasses.replace(result, model=attacked, trigger=trigger,
                                     clean_accuracy=after["clean_accuracy"],
                                     attack_success_rate=after["attack_success_rate"])
        int8_steps = attack.int8_steps_
    model_path = models_dir / f"{key}{'.pt' if entry.normalised else '.safetensors'}"
    if result.trigger is not None:  # the trigger first: a model file alone is not a finished entry
        result.trigger.save(trigger_path_for(model_path))
    model, extra = result.model, {}
    if entry.normalised:  # the same net, exported to take (x - mean) / std as foreign models do
        mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
        model, extra = ExpectsNormalised(model, mean, std), {"mean": mean, "std": std}
    save_model(model, model_path, metadata={"data_sha256": data.sha256},
               int8_steps=None if entry.normalised else int8_steps)
    record = {"name": entry.name, "key": key, "spec": entry.spec(), "trojaned": entry.trojaned,
              "model_file": model_path.name, "arch": result.params["arch"], **extra,
              "all_to_all": bool(result.trigger is not None and result.trigger.all_to_all),
              "target": result.trigger.target if result.trigger else None,
              "targets": result.trigger.targets if result.trigger else [],
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


def _cached_row(out: Path, model_sha256: str, keys: set[str]) -> dict[str, Any] | None:
    """A measurement saved earlier for the same model, if it is intact."""
    if out.is_file():
        try:
            row = read_json(out, "zoo measurement")
            if isinstance(row, dict) and row.get("model_sha256") == model_sha256 and keys <= set(row):
                return row
        except TrojanscanError:
            pass  # damaged: measure again
    return None


def _precision_tag(precision: str) -> dict[str, str]:
    """The precision as part of a cache tag: nothing for float32, so earlier zoos' caches hold."""
    return {} if precision == "float32" else {"precision": precision}


def _module(model_path: Path, data: Dataset, record: dict[str, Any], precision: str = "float32") -> Any:
    """A zoo model in [0, 1] pixel space (wrapped when it expects normalised inputs), on the CPU in
    ``precision``."""
    module = load_model(model_path, input_shape=data.input_shape).module
    module = wrap_normalization(module, record.get("mean"), record.get("std"), data.input_shape[0])[0]
    cpu = torch.device("cpu")
    return place(module, cpu, resolve_precision(precision, module, cpu))


def _evidence_row(method: str, model_path: Path, record: dict[str, Any], data: Dataset, out: Path,
                  seed: int, clean_samples: int, precision: str = "float32") -> dict[str, Any]:
    """MM-BD's or the pair search's evidence on one zoo model (cached beside its scans)."""
    cached = _cached_row(out, record["model_sha256"], {"evidence", "seconds"})
    if cached is not None:
        return cached
    module = _module(model_path, data, record, precision)
    start = time.perf_counter()
    inspector = INSPECTORS[method](seed=seed)
    x, y = clean_subset(data, clean_samples, seed) if inspector.needs_data else (None, None)
    evidence = inspector.inspect(module, x, y, num_classes=data.num_classes,
                                 input_shape=data.input_shape).to_dict()
    row = {"method": method, "seed": seed, "evidence": evidence, "seconds": time.perf_counter() - start,
           "model_sha256": record["model_sha256"]}
    write_json(out, row)
    return row


def _strip_row(model_path: Path, record: dict[str, Any], data: Dataset, out: Path, seed: int, n: int,
               samples: int, temperature: float | str = 1.0, boundary: str = "normal") -> dict[str, Any]:
    model_sha256 = record["model_sha256"]
    cached = _cached_row(out, model_sha256, {"frr", "far", "seconds"})
    if cached is not None:
        return cached
    module = _module(model_path, data, record)
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
    preset: str = "classic"  # classic (the README's zoos) or world (architectures, conventions, attacks)
    attacks: Sequence[str] | None = None  # world: the attack kinds to draw in turn (default: WORLD_ATTACKS)
    archs: Sequence[str] | None = None  # world: the architectures to turn through (default: all four)
    runner: str = "local"  # who runs the scan jobs: local (one process or a pool) or ray
    workers: int = 1
    address: str | None = None  # runner ray: join this cluster (default: start one here)
    device: str = "cpu"  # where the scans run the models (auto, cpu, cuda, mps)
    precision: str = "float32"  # the scans' arithmetic (float32, bfloat16, auto)

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise TrojanscanError(("no method given" if not self.methods else
                                   f"unknown zoo method(s) {', '.join(unknown)}")
                                  + f"; choose from {', '.join(METHODS)}")
        self.strip_temperature = parse_temperature(self.strip_temperature)
        check_choice("STRIP boundary", self.strip_boundary, BOUNDARY_METHODS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("zoo preset", self.preset, PRESETS)
        check_choice("runner", self.runner, RUNNERS)
        check_choice("precision", self.precision, PRECISIONS)
        if self.train_samples is not None and self.train_samples < 10:
            raise TrojanscanError(f"--train-samples must be >= 10, got {self.train_samples}")
        if self.steps is not None and self.steps < 1:
            raise TrojanscanError(f"--steps must be >= 1, got {self.steps}")
        for name, value, low in (("--size", self.size, 2), ("--repeats", self.repeats, 1),
                                 ("--epochs", self.epochs, 1), ("--clean-samples", self.clean_samples, 1),
                                 ("--strip-n", self.strip_n, 2), ("--strip-samples", self.strip_samples, 10),
                                 ("--workers", self.workers, 1)):
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
                       train_samples=opts.train_samples, preset=opts.preset, attacks=opts.attacks,
                       archs=opts.archs)
    scan_options = {"schedule": opts.schedule, "steps": opts.steps, "clean_samples": opts.clean_samples,
                    **_precision_tag(opts.precision)}
    results: dict[str, Any] = {"benchmark": "zoo", "options": dataclasses.asdict(opts),
                               "environment": environment(), "complete": False, "models": []}
    for stale in ("summary.md", "report.html", "roc.png"):  # an earlier run's, maybe other options
        (out / stale).unlink(missing_ok=True)
    start = time.perf_counter()
    trained, jobs = [], {}  # each model's record and its scan jobs per method (run together below)
    for entry in entries:
        record = train_entry(entry, data[entry.dataset], out / "models")
        model_path = model_file(out / "models", record)
        convention = {"mean": record.get("mean"), "std": record.get("std")}
        asr = record["attack_success_rate"]
        log(f"[{entry.index + 1}/{len(entries)}] {entry.name}: CA {record['clean_accuracy']:.4f}"
            + (f" ASR {asr:.4f}" if asr is not None else "")
            + (" (cached)" if record["cached"] else f" trained in {record['train_seconds']:.0f} s"))
        trained.append((entry, record, model_path))
        for method in (m for m in opts.methods if m in SCAN_METHODS):
            folder = out / "scans" / record["key"]
            # each scan resumes in its folder: labels finished with the same model, data, settings
            # and algorithm version are reused by its fingerprint check, others searched again
            jobs[record["key"], method] = [
                ScanJob(str(model_path), entry.dataset,
                        str(folder / f"{method}-seed{s}-{_tag(scan_options)}"), method,
                        {"schedule": opts.schedule, "steps": opts.steps, "seed": s},
                        clean_samples=opts.clean_samples,
                        mean=tuple(convention["mean"]) if convention["mean"] else None,
                        std=tuple(convention["std"]) if convention["std"] else None, device=opts.device,
                        precision=opts.precision)
                for s in range(opts.seed, opts.seed + opts.repeats)]
    records = run_jobs([j for js in jobs.values() for j in js], workers=opts.workers, runner=opts.runner,
                       address=opts.address)
    failed = {r.job.out_dir: r.error for r in records if not r.ok}
    for entry, record, model_path in trained:
        dataset = data[entry.dataset]
        record["scans"] = {}
        for method in (m for m in opts.methods if m in SCAN_METHODS):
            errors = [failed[j.out_dir] for j in jobs[record["key"], method] if j.out_dir in failed]
            if errors:
                raise TrojanscanError(f"{entry.name}: {errors[0]}")
            runs = [ScanResult.load(j.out_dir) for j in jobs[record["key"], method]]
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
            record["strip"] = _strip_row(model_path, record, dataset,
                                         out / "scans" / record["key"] /
                                         f"strip-seed{opts.seed}-{_tag(settings)}.json", opts.seed,
                                         opts.strip_n, opts.strip_samples, opts.strip_temperature,
                                         opts.strip_boundary)
            log(f"    strip: FRR {record['strip']['frr']:.3f}"
                + (f" FAR {record['strip']['far']:.3f}" if record["trojaned"] else ""))
        for method in (m for m in opts.methods if m in EVIDENCE_METHODS):
            settings = {"clean_samples": opts.clean_samples,  # a cached row only for the same settings
                        **dataclasses.asdict(INSPECTORS[method](seed=opts.seed).options()),
                        **_precision_tag(opts.precision)}
            row = _evidence_row(method, model_path, record, dataset, out / "scans" / record["key"] /
                                f"{method}-seed{opts.seed}-{_tag(settings)}.json", opts.seed,
                                opts.clean_samples, opts.precision)
            record.setdefault("evidence", {})[method] = row
            log(f"    {method}: {evidence_summary(method, row['evidence'])} ({row['seconds']:.1f} s)")
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
