"""The local runner: jobs one after another in this process, or over a pool of worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor

from trojanscan.runners.jobs import JobRecord, ScanJob, run_job


def run_jobs(jobs: Iterable[ScanJob], *, workers: int = 1,
             on_done: Callable[[JobRecord], None] | None = None) -> list[JobRecord]:
    """Run every job and return their records in order; ``workers > 1`` uses that many processes
    (each job is a pure function of its paths and settings, so they share nothing but the disk)."""
    jobs = list(jobs)
    records: list[JobRecord] = []
    if workers <= 1:
        for job in jobs:
            records.append(run_job(job))
            if on_done is not None:
                on_done(records[-1])
        return records
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for record in pool.map(run_job, jobs):
            records.append(record)
            if on_done is not None:
                on_done(record)
    return records
