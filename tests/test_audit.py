"""Auditing many models: manifests, a failing model, resume, and the same results from every runner
and every split of the labels."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from typer.testing import CliRunner

from trojanscan.api import audit
from trojanscan.cli import app
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import folder_lock
from trojanscan.models import save_model
from trojanscan.runners import ScanJob, collect_models, read_manifest, run_jobs
from trojanscan.runners import local as local_runner

SCAN = {"steps": 10, "seed": 0, "chunk": 5}  # short; 2 chunks per model, so label jobs can split


@pytest.fixture(scope="module")
def models(trojaned_digits, clean_digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit") / "models"
    folder.mkdir()
    save_model(trojaned_digits.model, folder / "bad.safetensors")
    save_model(clean_digits.model, folder / "clean.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a model")
    return folder


def _scans(out, names=("bad", "clean")):
    return {n: ScanResult.load(out / n).to_dict(timings=False) for n in names}


def _files(folder, *names):
    """Stand-ins for model files: a manifest is read without opening its models."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return folder


def test_manifests_csv_and_json(tmp_path):
    _files(tmp_path / "nets", "bad.safetensors", "clean.safetensors", "notes.txt")
    models = _files(tmp_path / "models", "bad.safetensors", "broken.safetensors", "clean.safetensors")
    (tmp_path / "m.csv").write_text('path,data,mean,std,name\nnets/bad.safetensors,digits,0.5,"0.25",b\n'
                                    "nets/clean.safetensors,,0.1;0.2;0.3,,\n")
    bad, clean = read_manifest(tmp_path / "m.csv")  # paths relative to the manifest's folder
    assert (bad.path, bad.name, bad.data, bad.mean, bad.std) == (
        str(tmp_path / "nets" / "bad.safetensors"), "b", "digits", (0.5,), (0.25,))
    assert clean.data is None and clean.mean == (0.1, 0.2, 0.3) and clean.name == ""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.json").write_text(json.dumps({"models": [
        {"path": "../nets/bad.safetensors", "arch": "mnist-cnn", "mean": [0.5], "trigger": "t.npz"}]}))
    [entry] = read_manifest(tmp_path / "sub" / "m.json")
    assert (entry.arch, entry.mean, entry.trigger) == ("mnist-cnn", (0.5,), str(tmp_path / "sub" / "t.npz"))
    # folders, a file given twice, a manifest, clashing stems: each file once, names unique and stable
    given = [tmp_path / "m.csv", models, tmp_path / "nets", models / "clean.safetensors"]
    names = [e.name for e in collect_models(given)]
    assert names[0] == "b" and names[2:4] == ["bad", "broken"] and len(set(names)) == 5
    assert names[1].startswith("clean-") and names[4].startswith("clean-")
    assert names == [e.name for e in collect_models(given)]
    with pytest.raises(TrojanscanError, match="no such model file, folder or manifest"):
        collect_models([tmp_path / "nothing.pt"])


@pytest.mark.parametrize("text, message", [
    ("path,colour\nx.pt,red\n", "row 2: unknown field(s) 'colour'"),
    ("data\ndigits\n", "needs a header row with a 'path' column"),
    ("path,mean\nbad.safetensors,abc\n", "row 2: 'mean': expected numbers"),
    ("path\nbad.safetensors\nmissing.pt\n", "row 3: 'path' missing.pt: no such model file"),
    ("path,mean\nbad.safetensors,0.1,0.2\n", "row 2: more cells than header fields"),
    ('[{"path": 3}]', "model 1: 'path' must be text"),
    ('{"models": 1}', "a JSON manifest is a list of models"),
    ("[]", "the manifest lists no models"),
])
def test_manifest_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / ("m.json" if text[0] in "[{" else "m.csv")
    path.write_text(text)
    _files(tmp_path, "bad.safetensors")
    with pytest.raises(TrojanscanError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        read_manifest(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_failing_model_is_recorded_and_a_rerun_redoes_nothing(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["audit", str(models), "--data", "digits", "--out", str(out), "--steps", "10", "--chunk", "5",
            "--clean-samples", "100"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "1 model(s) failed: broken" in first.output
    summary = json.loads((out / "audit.json").read_text())
    by_name = {m["name"]: m for m in summary["models"]}
    assert summary["complete"] and by_name["broken"]["status"] == "error"
    assert "broken.safetensors" in by_name["broken"]["error"]
    assert by_name["bad"]["status"] == "ok" and 0 in by_name["bad"]["flagged_labels"]
    assert by_name["bad"]["report"] == "bad/report.html" and (out / "bad" / "report.html").is_file()
    html = (out / "audit.html").read_text()
    assert 'href="bad/report.html"' in html and "sortable" in html
    stamps = {n: (out / n / "scan.json").stat().st_mtime_ns for n in ("bad", "clean")}
    ran = []
    real = local_runner.run_job_safely
    monkeypatch.setattr(local_runner, "run_job_safely", lambda job: ran.append(job) or real(job))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1
    assert [j.model for j in ran] == [str(models / "broken.safetensors")]  # only the failed one again
    assert stamps == {n: (out / n / "scan.json").stat().st_mtime_ns for n in ("bad", "clean")}


def test_an_interrupted_audit_resumes_without_redoing_finished_models(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    files = [models / "bad.safetensors", models / "clean.safetensors"]

    def stop(entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit(files, "digits", out_dir=out, options=SCAN, clean_samples=100, workers=1,  # in order
              on_model_done=stop)
    summary = json.loads((out / "audit.json").read_text())
    assert [m["status"] for m in summary["models"]] == ["ok", "pending"] and not summary["complete"]
    ran = []
    real = local_runner.run_job_safely
    monkeypatch.setattr(local_runner, "run_job_safely", lambda job: ran.append(job) or real(job))
    result = audit(files, "digits", out_dir=out, options=SCAN, clean_samples=100)
    assert [j.model for j in ran] == [str(files[1])]
    assert [m["status"] for m in result.models] == ["ok", "ok"] and result.models[0]["skipped"]


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    audit([models / "bad.safetensors", models / "clean.safetensors"], "digits", out_dir=out, options=SCAN,
          clean_samples=100, workers=1)
    return _scans(out)


@pytest.mark.parametrize("split_over", [20, 3])  # 3: each model's 10 labels in two label jobs
def test_two_workers_and_label_jobs_give_the_result_of_one_process(models, one_process, tmp_path, split_over):
    out = tmp_path / "out"
    result = audit([models / "bad.safetensors", models / "clean.safetensors"], "digits", out_dir=out,
                   options=SCAN, clean_samples=100, workers=2, split_over=split_over)
    assert [m["status"] for m in result.models] == ["ok", "ok"]
    assert not (out / "bad" / "parts").exists()  # the label jobs' results were gathered
    assert _scans(out) == one_process


def test_ray_runner_gives_the_same_result(models, one_process, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed (pip install -e ".[ray]")')
    out = tmp_path / "out"
    result = audit([models / "bad.safetensors", models / "clean.safetensors"], "digits", out_dir=out,
                   options=SCAN, clean_samples=100, runner="ray", workers=2, split_over=3)
    assert [m["status"] for m in result.models] == ["ok", "ok"]
    assert _scans(out) == one_process


def test_ray_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    hint = r'needs Ray, which is not installed: pip install -e "\.\[ray\]"'
    with pytest.raises(TrojanscanError, match=hint):
        run_jobs([ScanJob("m.safetensors", "digits", str(tmp_path))], runner="ray")


def test_an_audit_folder_in_use_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    with folder_lock(out):
        result = CliRunner().invoke(app, ["audit", str(tmp_path / "m.pt"), "--data", "digits",
                                          "--out", str(out)])
    assert result.exit_code == 2 and "in use by another trojanscan command" in result.output


def test_every_job_of_an_audit_runs_on_one_thread_whatever_the_runner(monkeypatch):
    import os

    import torch

    from trojanscan.runners import audit as audit_module
    from trojanscan.runners.jobs import JobRecord

    seen = []
    monkeypatch.setattr(local_runner, "run_job",
                        lambda job: seen.append((torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
                        or JobRecord(job, True, 0.0))
    before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    jobs = [ScanJob("m.safetensors", "digits", "out")]
    run_jobs(jobs, threads=audit_module.JOB_THREADS)
    assert seen == [(1, "1")]
    assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == before  # restored after
    run_jobs(jobs)
    assert seen[-1][0] == before[0]  # without threads= the process is left as it is


def test_population_evidence_joins_each_model_of_a_large_enough_group(tmp_path):
    """Models of one data with Neural Cleanse scans get the population evidence (a label easy on one
    model only is flagged, a shortcut all share is not); a group too small, a failed model and another
    data's lone model get none; audit.html and the CLI table show it."""
    from trojanscan.cli import _population_text
    from trojanscan.defenses.verdict import combined_p_value
    from trojanscan.report.audit_html import write_audit_report
    from trojanscan.runners.audit import AuditResult, add_population

    natural = [60.0, 90, 100, 95, 110, 105, 98, 102, 30.0, 97]
    folders, entries = {}, []
    for i, name in enumerate(["a", "b", "c", "d", "trojaned", "failed", "other"]):
        norms = [v * (1 + 0.03 * ((i + k) % 3 - 1)) for k, v in enumerate(natural)]
        if name == "trojaned":
            norms[3] = 8.0
        (tmp_path / name).mkdir()
        (tmp_path / name / "scan.json").write_text(json.dumps(
            {"labels": [{"label": k, "l1_norm": v} for k, v in enumerate(norms)],
             **({"mm-bd": {"p_value": 0.2}} if name == "a" else {})}))
        folders[name] = ("mnist" if name != "other" else "gtsrb", tmp_path / name)
        entries.append({"name": name, "status": "error" if name == "failed" else "ok"})
    result = AuditResult(tmp_path, entries)
    add_population(result, folders)
    got = {m["name"]: m.get("population") for m in result.models}
    assert got["trojaned"]["says"] == "backdoor" and got["trojaned"]["target"] == 3
    assert all(got[n]["says"] == "clean" and got[n]["models"] == 4 for n in "abcd")
    assert got["failed"] is None and got["other"] is None
    assert got["a"]["score"] == pytest.approx(combined_p_value([got["a"]["p_value"], 0.2]))  # MM-BD's
    assert got["b"]["score"] == got["b"]["p_value"]  # no MM-BD: the size evidence alone
    page = write_audit_report(result.to_dict(), tmp_path / "audit.html").read_text()
    assert "backdoor: " in page and "(label 3)" in page
    assert _population_text(got["trojaned"]).startswith("backdoor p ")
    # a resumed audit whose group shrank: the entries carried over lose their old evidence
    small = AuditResult(tmp_path, [{"name": n, "status": "ok", "population": got[n]} for n in "abc"])
    add_population(small, {n: folders[n] for n in "abc"})
    assert all("population" not in m for m in small.models)


def test_an_audit_of_four_models_of_one_data_carries_the_population_evidence(models, tmp_path):
    """The audit itself adds the evidence once four models of the same data are scanned (here three
    copies of the clean model beside the trojaned one, short scans)."""
    import shutil

    files = [models / "bad.safetensors"]
    for i in range(3):
        files.append(tmp_path / f"clean{i}.safetensors")
        shutil.copy(models / "clean.safetensors", files[-1])
    result = audit(files, "digits", out_dir=tmp_path / "out", options=SCAN, clean_samples=100, workers=1)
    assert all(m["status"] == "ok" and m["population"]["models"] == 3 for m in result.models)
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert saved["models"][0]["population"] == result.models[0]["population"]
