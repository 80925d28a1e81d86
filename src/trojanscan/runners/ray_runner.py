"""The Ray runner: the same jobs as the local runner, as Ray tasks on this machine or a cluster.

Ray is an optional extra (``pip install -e ".[ray]"``) imported only here. A job's results are
written under its own folder, atomically and keyed by the content that made them (the scan's
fingerprint), so a task Ray retries, or one that runs twice, is harmless. The machines of a cluster
must see the models, data and output folder at the same paths (a shared file system).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from trojanscan.errors import TrojanscanError
from trojanscan.runners.jobs import JobRecord, ScanJob
from trojanscan.runners.local import pin_threads, run_job_safely, threads_per_worker

INSTALL_HINT = 'pip install -e ".[ray]"'


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise TrojanscanError(f"--runner ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _run_pinned(job: ScanJob, threads: int) -> JobRecord:
    pin_threads(threads)
    return run_job_safely(job)


@contextlib.contextmanager
def ray_session(workers: int = 1, address: str | None = None) -> Iterator[Any]:
    """Ray, connected for the block: to the cluster at ``address``, or to a local one of ``workers``
    CPUs started here and stopped at the end; a connection already open is used as it is."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            # Ray runs its workers at niceness 15 by default: on a busy machine they would get a
            # fraction of the cores their local-runner twins get (3-4x slower measured at load 9)
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, _system_config={"worker_niceness": 0})
    except (ConnectionError, RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrojanscanError(f"could not start or join a Ray cluster ({why})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def run_jobs_on_ray(jobs: Sequence[ScanJob], *, workers: int = 1, address: str | None = None,
                    threads: int | None = None, on_done: Callable[[JobRecord], None] | None = None,
                    in_flight: int | None = None) -> list[JobRecord]:
    """Run ``jobs`` as Ray tasks (one CPU each, at most ``in_flight`` submitted at a time, by default
    twice the cluster's CPUs) and return their records in the jobs' order (see :func:`ray_session`
    for ``workers`` and ``address``, :func:`~trojanscan.runners.local.run_jobs` for ``threads``)."""
    with ray_session(workers, address) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", workers)))
        threads = threads or (1 if address else threads_per_worker(min(workers, cpus)))
        task = ray.remote(num_cpus=1, max_retries=2)(_run_pinned)
        limit = in_flight or 2 * cpus
        records: list[JobRecord | None] = [None] * len(jobs)
        pending: dict[Any, int] = {}
        queue = list(enumerate(jobs))[::-1]
        while queue or pending:
            while queue and len(pending) < limit:
                i, job = queue.pop()
                pending[task.remote(job, threads)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    records[i] = ray.get(ref)
                except ray.exceptions.RayError as e:  # a worker lost for good: the job's error
                    records[i] = JobRecord(jobs[i], False, 0.0,
                                           error=f"Ray task failed: {str(e).splitlines()[0]}")
                if on_done is not None:
                    on_done(records[i])  # type: ignore[arg-type]
        return records  # type: ignore[return-value]
