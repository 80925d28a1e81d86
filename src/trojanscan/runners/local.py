"""The local runner: jobs one after another in this process, or over a pool of worker processes whose
torch threads are pinned so that the workers share the cores instead of fighting over them. It also
hands jobs to the Ray runner (``runner="ray"``), which is imported only then."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from trojanscan.runners.jobs import JobRecord, ScanJob, run_job
from trojanscan.validation import check_choice

RUNNERS = ("local", "ray")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_worker(workers: int) -> int:
    """This machine's cores shared out: at least one torch thread per worker."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def pin_threads(threads: int) -> None:
    """Limit this process to ``threads`` compute threads (torch's and the BLAS libraries')."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def pinned(threads: int | None) -> Iterator[None]:
    """This process limited to ``threads`` compute threads for the block (nothing when None)."""
    if threads is None:
        yield
        return
    saved = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_VARIABLES}
    pin_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        for name, value in saved[1].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_job_safely(job: ScanJob) -> JobRecord:
    """:func:`run_job`, with an unexpected failure (a model that breaks the scan in a way no check
    foresaw) recorded as the job's error, so that one model cannot stop a batch."""
    start = time.perf_counter()
    try:
        return run_job(job)
    except Exception as e:  # the batch goes on; the error is in the record
        return JobRecord(job, False, time.perf_counter() - start,
                         error=f"unexpected {type(e).__name__}: {e}".splitlines()[0])


def runner_session(runner: str = "local", workers: int = 1, address: str | None = None) -> Any:
    """A context for several :func:`run_jobs` calls on one runner: for Ray, one connection (a local
    cluster started once); for the local runner, nothing."""
    check_choice("runner", runner, RUNNERS)
    if runner == "ray":
        from trojanscan.runners.ray_runner import ray_session

        return ray_session(workers, address)
    return contextlib.nullcontext()


def run_jobs(jobs: Iterable[ScanJob], *, workers: int = 1, runner: str = "local", address: str | None = None,
             threads: int | None = None,
             on_done: Callable[[JobRecord], None] | None = None) -> list[JobRecord]:
    """Run every job and return their records in the jobs' order; ``on_done`` sees each record as it
    finishes. ``workers > 1`` runs that many processes (each job is a pure function of its paths and
    settings, so they share nothing but the disk); ``runner="ray"`` hands the jobs to Ray tasks, on
    the cluster at ``address`` or on a local one of ``workers`` CPUs. ``threads``: the compute
    threads of every job, whatever the runner (CPU kernels round differently with different thread
    counts, so equal ``threads`` is what makes runs of different runners identical); by default the
    cores shared out among the workers."""
    check_choice("runner", runner, RUNNERS)
    jobs = list(jobs)
    if not jobs:
        return []
    if runner == "ray":
        from trojanscan.runners.ray_runner import run_jobs_on_ray

        return run_jobs_on_ray(jobs, workers=workers, address=address, threads=threads, on_done=on_done)
    records: list[JobRecord | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        with pinned(threads):
            for i, job in enumerate(jobs):
                records[i] = run_job_safely(job)
                if on_done is not None:
                    on_done(records[i])
        return records  # type: ignore[return-value]
    workers = min(workers, len(jobs))
    with ProcessPoolExecutor(max_workers=workers, initializer=pin_threads,
                             initargs=(threads or threads_per_worker(workers),)) as pool:
        futures = {pool.submit(run_job_safely, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            records[futures[future]] = record = future.result()
            if on_done is not None:
                on_done(record)
    return records  # type: ignore[return-value]
