"""The job seam: a picklable scan job, a pure run_job, label jobs that merge into one scan's result."""

from __future__ import annotations

import pickle

import pytest

from trojanscan.defenses.scan_result import ScanResult
from trojanscan.models import save_model
from trojanscan.runners import ScanJob, merge_scans, run_job, run_jobs, split_labels


@pytest.fixture(scope="module")
def model_file(trojaned_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "m.safetensors"
    save_model(trojaned_digits.model, path)
    return path


@pytest.mark.parametrize("method", ["neural-cleanse", "tabor"])
def test_label_jobs_merge_into_the_result_of_one_scan(model_file, tmp_path, method):
    job = ScanJob(str(model_file), "digits", str(tmp_path / "whole"), method,
                  {"steps": 15 if method == "tabor" else 30, "chunk": 4, "seed": 0}, clean_samples=100)
    assert pickle.loads(pickle.dumps(job)) == job  # it can travel to another process
    whole = run_job(job)
    assert whole.ok and 0 in whole.flagged_labels
    parts = split_labels(job, 10, 2)
    assert [p.labels for p in parts] == [(0, 1, 2, 3, 4, 5, 6, 7), (8, 9)]  # cut on chunk boundaries
    assert all(r.ok for r in run_jobs(parts))
    merged = merge_scans([ScanResult.load(p.out_dir) for p in parts], tmp_path / "merged")
    one = ScanResult.load(tmp_path / "whole")
    assert merged.flagged_labels == one.flagged_labels
    assert [r.l1_norm for r in merged.labels] == [r.l1_norm for r in one.labels]
    assert [r.anomaly_index for r in merged.labels] == [r.anomaly_index for r in one.labels]
    assert merged.anomaly_index == one.anomaly_index
    if method == "tabor":  # the method's own summary is recomputed over all labels
        assert merged.extra["quality"] == one.extra["quality"]
    assert ScanResult.load(tmp_path / "merged").flagged_labels == one.flagged_labels
    assert not [w for w in merged.warnings if "fewer than 3" in w]  # part 2 alone had 2 labels


def test_a_failed_job_is_recorded_not_raised(tmp_path):
    record = run_job(ScanJob(str(tmp_path / "missing.pt"), "digits", str(tmp_path / "out")))
    assert not record.ok and "no such model file" in record.error


def test_partial_scans_of_different_settings_do_not_merge(model_file, tmp_path):
    from trojanscan.errors import TrojanscanError

    a = ScanJob(str(model_file), "digits", str(tmp_path / "a"), options={"steps": 5, "seed": 0},
                labels=(0, 1, 2), clean_samples=100)
    b = ScanJob(str(model_file), "digits", str(tmp_path / "b"), options={"steps": 5, "seed": 1},
                labels=(3, 4, 5), clean_samples=100)
    run_jobs([a, b])
    with pytest.raises(TrojanscanError, match="different"):
        merge_scans([ScanResult.load(a.out_dir), ScanResult.load(b.out_dir)])
