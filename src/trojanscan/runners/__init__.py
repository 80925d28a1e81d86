"""Jobs and runners: a picklable scan job, a pure function that runs it, and runners that map jobs
(one process, a pool of processes, or Ray tasks on this machine or a cluster); the models of an
audit (files, folders, manifests) and the audit itself (``runners.audit``: above the workflows, as
it runs scan jobs)."""

from trojanscan.runners.jobs import JobRecord, ScanJob, merge_scans, run_job, split_labels
from trojanscan.runners.local import RUNNERS, run_jobs, runner_session
from trojanscan.runners.manifest import ModelEntry, collect_models, read_manifest

__all__ = ["RUNNERS", "JobRecord", "ModelEntry", "ScanJob", "collect_models", "merge_scans", "read_manifest",
           "run_job", "run_jobs", "runner_session", "split_labels"]
