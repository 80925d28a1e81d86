"""Auditing many models: every model of a list, folder or manifest scanned as one job per model (and
method), on the local runner (one process or a pool) or on Ray; a model with many labels is split
into label jobs when there are several workers. Per-model results go in ``OUT/<model>/`` as ``scan``
writes them; the summary ``audit.json`` is rewritten after every finished model and ``audit.html``
at the end. A rerun skips the models whose results are complete for the same file and settings;
an unfinished scan resumes label by label.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trojanscan.defenses.population import POPULATION_MIN, log_ratios, population_evidence
from trojanscan.defenses.registry import reverser
from trojanscan.defenses.scan_result import LABELS_DIR, SCAN_JSON
from trojanscan.defenses.verdict import ALPHA, p_value_says
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import atomic_write_bytes, locks_out_dir, read_json, sha256_file, write_json
from trojanscan.report.audit_html import write_audit_report
from trojanscan.runners import (
    RUNNERS,
    JobRecord,
    ModelEntry,
    ScanJob,
    collect_models,
    run_jobs,
    runner_session,
    split_labels,
)
from trojanscan.validation import check_choice
from trojanscan.workflows.inputs import as_dataset
from trojanscan.workflows.records import environment
from trojanscan.workflows.scanning import DECISIONS

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
PARTS_DIR = "parts"
SPLIT_OVER = 20  # with several workers, a model with more labels than this is split into label jobs
# Every scan job of an audit runs on one compute thread, whatever the runner and the number of
# workers: CPU kernels round differently with other thread counts (a 2-thread MNIST scan's trigger
# norms differ from a 1-thread one's by up to 0.07), and an audit's results must not depend on how
# it was run. The cores are used by running one worker per core instead (the default).
JOB_THREADS = 1
POPULATION_METHOD = "neural-cleanse"  # the scans whose trigger sizes are held to each other


@dataclass
class AuditResult:
    """The audit's summary (the content of ``audit.json``): one entry per model, in order."""

    out_dir: Path
    models: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The models whose audit stopped on an error."""
        return [m for m in self.models if m["status"] == "error"]

    def to_dict(self) -> dict[str, Any]:
        done = all(m["status"] in ("ok", "error") for m in self.models)
        return {"audit": "trojanscan", "complete": done, "settings": self.settings,
                "environment": environment(), "models": self.models}


def _settings_key(job: ScanJob) -> str:
    """What a finished scan must have been made with to be reused: everything but the paths and the
    device (as in the scan's own fingerprint; float32, the default precision, is left out so that
    earlier audits resume)."""
    settings = {k: v for k, v in vars(job).items() if k not in ("model", "out_dir", "device")
                and not (k == "precision" and v == "float32")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scan_summary(out: Path, root: Path) -> dict[str, Any]:
    """A finished scan folder's answer, read from its scan.json (no arrays); its report's path is
    relative to the audit's folder ``root``."""
    result = read_json(out / SCAN_JSON, "scan result")
    verdict = result.get("verdict", {}).get("verdict") if isinstance(result.get("verdict"), dict) else None
    index = result.get("anomaly_index")
    if verdict is None:
        verdict = ("backdoored" if result.get("infected") else
                   "clean" if isinstance(index, float) and index == index else "no verdict")
    return {"verdict": verdict, "infected": bool(result.get("infected")),
            "flagged_labels": result.get("flagged_labels", []), "anomaly_index": index,
            "report": (out / "report.html").relative_to(root).as_posix(),
            "warnings": result.get("warnings", [])}


def _profile(folder: Path) -> tuple[list[float], float | None] | None:
    """A finished trigger-search scan's per-label log size ratios and MM-BD's p-value (when its verdict
    gathered one); ``None`` for a scan without per-label trigger sizes."""
    try:
        result = read_json(folder / SCAN_JSON, "scan result")
        norms = [float(r["l1_norm"]) for r in sorted(result["labels"], key=lambda r: int(r["label"]))]
        margin = result.get("mm-bd", {}).get("p_value") if isinstance(result.get("mm-bd"), dict) else None
    except (TrojanscanError, KeyError, TypeError, ValueError):
        return None
    return (log_ratios(norms), float(margin) if isinstance(margin, (int, float)) else None) if norms else None


def add_population(result: AuditResult, folders: dict[str, tuple[str, Path]]) -> None:
    """Hold each model's trigger sizes to the same labels on the audit's other models of the same data
    (``trojanscan.defenses.population``), for every group of at least POPULATION_MIN + 1 models; the
    evidence goes in each model's entry as ``population``. ``folders``: name → (data, scan folder)."""
    groups: dict[str, dict[str, tuple[list[float], float | None]]] = {}
    for m in result.models:
        m.pop("population", None)  # a resumed audit's entries may carry an earlier group's evidence
        if m["status"] == "ok" and m["name"] in folders:
            data, folder = folders[m["name"]]
            if (profile := _profile(folder)) is not None:
                groups.setdefault(data, {})[m["name"]] = profile
    by_name = {m["name"]: m for m in result.models}
    for members in groups.values():
        if len(members) <= POPULATION_MIN:
            continue
        found = population_evidence({n: p for n, (p, _) in members.items()},
                                    {n: q for n, (_, q) in members.items() if q is not None})
        for name, e in found.items():
            by_name[name]["population"] = {**e.to_dict(), "says": p_value_says(e.score), "threshold": ALPHA}


def _gather_parts(parts: list[ScanJob], out: Path) -> None:
    """Put the label results of a model's label jobs in its own scan folder, where the closing scan
    resumes them (each file carries the scan's fingerprint: one of other settings is searched again)."""
    (out / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    for part in parts:
        for src in sorted((Path(part.out_dir) / LABELS_DIR).glob("label_*.npz")):
            atomic_write_bytes(out / LABELS_DIR / src.name, src.read_bytes())


@locks_out_dir("audit folder")
def audit(models: Sequence[str | os.PathLike | ModelEntry], data: str | None = None, *,
          out_dir: str | os.PathLike, methods: Sequence[str] = ("neural-cleanse",), decision: str = "paper",
          options: dict[str, Any] | None = None, clean_samples: int = 1000,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None, arch: str | None = None,
          trusted: bool = False, device: str = "cpu", precision: str = "auto", runner: str = "local",
          workers: int | None = None, address: str | None = None, split_over: int = SPLIT_OVER,
          on_model_done: Callable[[dict[str, Any]], None] | None = None) -> AuditResult:
    """Scan every model of ``models`` (files, folders, CSV/JSON manifests or :class:`ModelEntry`)
    with clean ``data`` (a manifest may give each model its own), by each of ``methods`` with the
    method ``options`` and ``decision``, on ``device`` in ``precision``; results in ``out_dir``. A
    model that fails gets its error in the summary and the audit goes on.
    ``runner``/``workers``/``address``: see :func:`~trojanscan.runners.run_jobs`; by default one worker
    per core, each job on one thread (:data:`JOB_THREADS`), so the results are the same whatever the
    runner and the workers.
    ``on_model_done`` sees each model's summary entry.

    Example::

        result = audit(["zoo/models"], "mnist", out_dir="audit-out", workers=2)
        print([(m["name"], m["verdict"]) for m in result.models], result.failed)
    """
    check_choice("decision", decision, DECISIONS)
    check_choice("runner", runner, RUNNERS)
    for method in methods:
        reverser(method)
    if not methods:
        raise TrojanscanError("no method given")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise TrojanscanError(f"--workers must be >= 1, got {workers}")
    entries = collect_models(models)
    missing = [e.name for e in entries if not (e.data or data)]
    if missing:
        raise TrojanscanError(f"no data for model {missing[0]}: pass --data or give it in the manifest")
    out = Path(out_dir).absolute()  # jobs carry absolute paths: a worker may start elsewhere
    previous: dict[str, Any] = {}
    if (out / AUDIT_JSON).is_file():
        try:
            previous = {m["name"]: m for m in read_json(out / AUDIT_JSON, "audit summary")["models"]}
        except (TrojanscanError, KeyError, TypeError):
            previous = {}  # damaged: everything is checked again (finished labels are still reused)
    settings = {"methods": list(methods), "decision": decision, "options": options or {},
                "clean_samples": clean_samples, "runner": runner, "workers": workers}
    result = AuditResult(out, [], settings)
    jobs: dict[str, list[ScanJob]] = {}  # per model, its scan jobs (one per method)
    for e in entries:
        folder = out / e.name
        source = e.data or str(data)
        source = str(Path(source).absolute()) if Path(source).exists() else source  # else a name: mnist
        model_jobs = [ScanJob(str(Path(e.path).absolute()), source,
                              str(folder if len(methods) == 1 else folder / m),
                              m, dict(options or {}), clean_samples=clean_samples,
                              mean=e.mean or (tuple(mean) if mean else None),
                              std=e.std or (tuple(std) if std else None), arch=e.arch or arch,
                              trusted=trusted, decision=decision, device=device, precision=precision,
                              ground_truth=str(Path(e.trigger).absolute()) if e.trigger else None)
                      for m in methods]
        entry: dict[str, Any] = {"name": e.name, "path": e.path, "sha256": None, "status": "pending",
                                 "error": None, "seconds": 0.0,
                                 "settings": [_settings_key(j) for j in model_jobs]}
        try:
            entry["sha256"] = sha256_file(e.path)
        except OSError as err:
            entry.update(status="error", error=f"{e.path}: unreadable ({err.strerror or err})")
        old = previous.get(e.name, {})
        if (entry["status"] == "pending" and old.get("status") == "ok"
                and (old.get("sha256"), old.get("settings")) == (entry["sha256"], entry["settings"])
                and all((Path(j.out_dir) / SCAN_JSON).is_file() for j in model_jobs)):
            entry = {**old, "skipped": True}  # finished earlier with this file and these settings
        elif entry["status"] == "pending":
            jobs[e.name] = model_jobs
        result.models.append(entry)
    write_json(out / AUDIT_JSON, result.to_dict())

    by_name = {m["name"]: m for m in result.models}
    pending = {name: len(model_jobs) for name, model_jobs in jobs.items()}  # whole scans to finish
    model_of: dict[str, str] = {}  # a job's folder → its model
    whole_of: dict[str, ScanJob] = {}  # a label job's folder → the model's whole scan
    to_close: dict[str, list[ScanJob]] = {}  # a split scan's folder → its label jobs
    first: list[ScanJob] = []
    classes: dict[str, int] = {}
    for name, model_jobs in jobs.items():
        for job in model_jobs:
            model_of[job.out_dir] = name
            parts = [job]
            if workers > 1:
                if job.data not in classes:
                    try:
                        classes[job.data] = as_dataset(job.data).num_classes
                    except TrojanscanError:
                        classes[job.data] = 0  # not split: the model's scan reports the data's problem
                if classes[job.data] > split_over:  # the verdict's evidence waits for the closing scan
                    split = dataclasses.replace(job, out_dir=str(Path(job.out_dir) / PARTS_DIR),
                                                decision="paper")
                    parts = to_close[job.out_dir] = split_labels(split, classes[job.data], workers)
            for part in parts:
                model_of[part.out_dir], whole_of[part.out_dir] = name, job
            first += parts
    waiting = {whole: len(parts) for whole, parts in to_close.items()}
    closing: list[ScanJob] = []

    def note(record: JobRecord) -> str:
        entry = by_name[model_of[record.job.out_dir]]
        entry["seconds"] += record.seconds
        if not record.ok and entry["status"] != "error":
            entry.update(status="error", error=record.error)
        return entry["name"]

    def scan_done(name: str) -> None:
        pending[name] -= 1
        if pending[name]:
            return
        entry = by_name[name]
        if entry["status"] != "error":
            scans = {j.method: _scan_summary(Path(j.out_dir), out) for j in jobs[name]}
            entry.update(status="ok", **scans[methods[0]])
            if len(methods) > 1:
                entry["scans"] = scans
            for j in jobs[name]:  # the label jobs' results now live in the model's scan folder
                shutil.rmtree(Path(j.out_dir) / PARTS_DIR, ignore_errors=True)
        write_json(out / AUDIT_JSON, result.to_dict())
        if on_model_done is not None:
            on_model_done(entry)

    def first_done(record: JobRecord) -> None:
        name = note(record)
        whole = whole_of[record.job.out_dir]
        if whole.out_dir not in to_close:
            scan_done(name)
            return
        waiting[whole.out_dir] -= 1
        if waiting[whole.out_dir] == 0:
            if by_name[name]["status"] == "error":
                scan_done(name)
            else:
                closing.append(whole)

    start = time.perf_counter()
    with runner_session(runner, workers, address) if first else contextlib.nullcontext():  # Ray: once
        run_jobs(first, workers=workers, runner=runner, address=address, threads=JOB_THREADS,
                 on_done=first_done)
        for job in closing:  # each split scan concluded in its folder from its labels' results
            _gather_parts(to_close[job.out_dir], Path(job.out_dir))
        run_jobs(closing, workers=workers, runner=runner, address=address, threads=JOB_THREADS,
                 on_done=lambda record: scan_done(note(record)))
    result.settings["wall_seconds"] = time.perf_counter() - start
    if POPULATION_METHOD in methods:  # the null was fitted on Neural Cleanse's trigger sizes
        add_population(result, {e.name: (e.data or str(data), out / e.name if len(methods) == 1
                                         else out / e.name / POPULATION_METHOD) for e in entries})
    write_json(out / AUDIT_JSON, result.to_dict())
    write_audit_report(result.to_dict(), out / AUDIT_HTML)
    return result
