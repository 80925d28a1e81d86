"""A scan as a job: everything it needs in a small picklable record, run by a pure function that
writes its results under ``out_dir`` (atomically, label by label: a retried or repeated job resumes
and is harmless) and returns a small record. A model with many labels can be split into label jobs
on chunk boundaries; merging them gives the result of one scan.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trojanscan.defenses.registry import reverser
from trojanscan.defenses.scan import conclude
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.errors import TrojanscanError
from trojanscan.report import save_trigger_images, write_scan_report
from trojanscan.workflows.scanning import scan


@dataclass(frozen=True)
class ScanJob:
    """One scan of one model (or of some of its labels): paths and settings only, so it pickles."""

    model: str
    data: str
    out_dir: str
    method: str = "neural-cleanse"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (schedule, seed …)
    labels: tuple[int, ...] | None = None
    clean_samples: int = 1000
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    arch: str | None = None
    trusted: bool = False  # load the model file unchecked (--trust-model)
    decision: str = "paper"  # or "verdict", "verdict-pairs" (scan's --decision)
    ground_truth: str | None = None  # the real trigger's file, to compare (default: beside the model)
    device: str = "cpu"  # where the model runs (auto, cpu, cuda, mps); results are the same CPU record
    precision: str = "auto"  # the model's arithmetic (float32, bfloat16, auto)


@dataclass
class JobRecord:
    """What a job returns: where its result is and the verdict, or the error that stopped it."""

    job: ScanJob
    ok: bool
    seconds: float
    flagged_labels: list[int] = field(default_factory=list)
    anomaly_index: float = math.nan
    error: str | None = None


def run_job(job: ScanJob) -> JobRecord:
    """Run ``job`` (resuming whatever its folder already holds); a user error is recorded, not raised,
    so one bad model does not stop a batch."""
    start = time.perf_counter()
    try:
        result = scan(job.model, job.data, method=job.method, labels=list(job.labels) if job.labels else None,
                      clean_samples=job.clean_samples, mean=list(job.mean) if job.mean else None,
                      std=list(job.std) if job.std else None, arch=job.arch, trusted=job.trusted,
                      out_dir=job.out_dir, decision=job.decision, ground_truth=job.ground_truth,
                      device=job.device, precision=job.precision,
                      progress=False, **job.options)
    except TrojanscanError as e:
        return JobRecord(job, False, time.perf_counter() - start, error=str(e))
    return JobRecord(job, True, time.perf_counter() - start, result.flagged_labels, result.anomaly_index)


def split_labels(job: ScanJob, num_classes: int, parts: int) -> list[ScanJob]:
    """``job`` as up to ``parts`` label jobs, each in its own sub-folder ``part-A-B``; the cuts fall on
    the method's chunk boundaries, so every label is optimised in the same batch as in one scan."""
    labels = list(job.labels) if job.labels else list(range(num_classes))
    chunk = int(job.options.get("chunk", getattr(reverser(job.method).options_type(), "chunk", 1)))
    chunks = [labels[i:i + chunk] for i in range(0, len(labels), chunk)]
    per_part = max(1, math.ceil(len(chunks) / max(1, parts)))
    jobs = []
    for i in range(0, len(chunks), per_part):
        part = [v for c in chunks[i:i + per_part] for v in c]
        jobs.append(dataclasses.replace(job, labels=tuple(part),
                                        out_dir=str(Path(job.out_dir) / f"part-{part[0]}-{part[-1]}")))
    return jobs


def merge_scans(parts: list[ScanResult], out_dir: str | Path | None = None) -> ScanResult:
    """One scan's result from the results of its label jobs: the labels together, the outlier test
    and the method's summary over all of them; with ``out_dir`` written as a scan folder."""
    if not parts:
        raise TrojanscanError("no partial scans to merge")
    first = parts[0]
    key = first.parameters.get("fingerprint")
    if any(p.parameters.get("fingerprint") != key for p in parts):
        raise TrojanscanError("the partial scans come from different models, data or settings")
    labels = sorted((r for p in parts for r in p.labels), key=lambda r: r.label)
    if len({r.label for r in labels}) != len(labels):
        raise TrojanscanError("the partial scans overlap: a label was scanned twice")
    merged = dataclasses.replace(
        first, labels=labels, seconds=sum(p.seconds for p in parts),
        parameters={**first.parameters, "labels": [r.label for r in labels]},
        warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)),
        extra={k: v for k, v in first.extra.items()})
    conclude(merged)
    reverser(merged.method).summarise(merged)
    if out_dir is not None:
        out = Path(out_dir)
        merged.save(out)
        save_trigger_images(merged, out)
        write_scan_report(merged, out / "report.html")
    return merged
