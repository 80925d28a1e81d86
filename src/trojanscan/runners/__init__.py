"""Jobs and runners: a picklable scan job, a pure function that runs it, and runners that map jobs
(one process, or a pool of processes) — the seam where more machines plug in."""

from trojanscan.runners.jobs import JobRecord, ScanJob, merge_scans, run_job, split_labels
from trojanscan.runners.local import run_jobs

__all__ = ["JobRecord", "ScanJob", "merge_scans", "run_job", "run_jobs", "split_labels"]
