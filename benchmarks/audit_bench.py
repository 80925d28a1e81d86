"""How an audit scales: the same models audited with 1 worker, 2 worker processes and Ray with 2
workers; the wall time of each, whether their results are identical, and a cost model; beside them, the same
models scanned one after another by ``scan`` with torch's own thread count (the baseline a user has
without ``audit``: every audit job runs on one thread so that the runners agree).

    python benchmarks/audit_bench.py --zoo zoo-out --out benchmarks/results/audit_bench.json
    python benchmarks/audit_bench.py --train 4 --steps 20 --clean-samples 200   # a quick check

``--zoo`` takes a ``trojanscan bench zoo`` output folder (its ``models/*.json`` records give each
model's data and input convention); ``--train N`` trains N small digits nets instead (half of them
with a BadNets patch). Run it on an idle machine: the figures are wall-clock times.

Cost model: one worker scans one model-label in ``s`` seconds (the 1-worker run's wall time over
models × labels); ``W`` workers on each of ``N`` nodes run at a measured efficiency ``e`` (the
2-worker speed-up over 2), so M models of K labels take ``s × M × K / (N × W × e)``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from trojanscan.api import audit, load_dataset, scan, train_classifier
from trojanscan.attacks import BadNets
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.fileio import read_json, write_json
from trojanscan.models import save_model
from trojanscan.runners import collect_models, runner_session
from trojanscan.workflows.records import environment

NODES = (1, 2, 4, 8, 16, 32)


def zoo_manifest(zoo: Path, work: Path, limit: int | None) -> tuple[Path, int]:
    """A manifest of a bench-zoo folder's models (path, data, mean, std); returns it and their labels."""
    records = [read_json(p, "zoo model record") for p in sorted((zoo / "models").glob("*.json"))]
    records = records[:limit] if limit else records
    if not records:
        sys.exit(f"{zoo}/models holds no zoo model records")
    path = work / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "name", "data", "mean", "std"])
        for r in records:
            w.writerow([str((zoo / "models" / r.get("model_file", f"{r['key']}.safetensors")).resolve()),
                        r["name"], r["data"]["source"], ";".join(map(str, r.get("mean") or [])),
                        ";".join(map(str, r.get("std") or []))])
    return path, load_dataset(records[0]["data"]["source"]).num_classes


def train_models(n: int, work: Path) -> tuple[Path, int]:
    """``n`` digits nets, every second one with a 3×3 BadNets patch → label 0."""
    folder = work / "models"
    folder.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits")
    for i in range(n):
        attack = BadNets(target=0, poison_rate=0.1, size=3, seed=i) if i % 2 else None
        result = train_classifier(data, "mnist-cnn", epochs=15, batch_size=64, attack=attack, seed=i,
                                  progress=False)
        save_model(result.model, folder / f"digits-{i:02d}.safetensors")
    return folder, data.num_classes


def sequential_scans(models: Path, data: str | None, options: dict, clean_samples: int, out: Path) -> float:
    """The baseline an audit competes with: ``scan`` of each model in turn in this process, with
    torch's own thread count (every core); returns the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    for entry in collect_models([models]):
        scan(entry.path, entry.data or data, mean=list(entry.mean) if entry.mean else None,
             std=list(entry.std) if entry.std else None, clean_samples=clean_samples,
             out_dir=out / entry.name, progress=False, **options)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, help="a trojanscan bench zoo output folder")
    ap.add_argument("--train", type=int, default=4, help="without --zoo: digits nets to train")
    ap.add_argument("--limit", type=int, help="audit only the first N models of the zoo")
    ap.add_argument("--data", default="digits", help="without --zoo: the data of the trained nets")
    ap.add_argument("--steps", type=int, help="maximum steps per label (default: the schedule's)")
    ap.add_argument("--clean-samples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("bench_out/audit_bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/audit_bench.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models, labels = (zoo_manifest(args.zoo, args.work, args.limit) if args.zoo
                      else train_models(args.train, args.work))
    options = {"seed": 0, **({"steps": args.steps} if args.steps else {})}
    configs = [("local", 1), ("local", args.workers)]
    if importlib.util.find_spec("ray") is not None:
        configs.append(("ray", args.workers))
    runs, scans = [], {}
    for runner, workers in configs:
        out = args.work / f"{runner}-{workers}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh audit: nothing resumed
        start = time.perf_counter()
        with runner_session(runner, workers):  # Ray's start, timed on its own too
            started = time.perf_counter() - start
            result = audit([models], None if args.zoo else args.data, out_dir=out, options=options,
                           clean_samples=args.clean_samples, runner=runner, workers=workers)
        wall = time.perf_counter() - start
        ok = [m for m in result.models if m["status"] == "ok"]
        scans[runner, workers] = {m["name"]: ScanResult.load(out / m["name"]).to_dict(timings=False)
                                  for m in ok}
        runs.append({"runner": runner, "workers": workers, "wall_seconds": wall, "start_seconds": started,
                     "models": len(ok),
                     "failed": [m["name"] for m in result.failed],
                     "seconds_per_model": wall / max(1, len(ok)),
                     "seconds_per_model_label_per_worker": wall * workers / max(1, len(ok) * labels),
                     "job_seconds_per_model": sum(m["seconds"] for m in ok) / max(1, len(ok))})
        print(f"{runner} × {workers}: {wall:.1f} s for {len(ok)} models", flush=True)
    baseline = sequential_scans(models, None if args.zoo else args.data, options, args.clean_samples,
                                args.work / "sequential")
    print(f"sequential scans, {torch.get_num_threads()} threads: {baseline:.1f} s", flush=True)
    one = runs[0]
    s = one["wall_seconds"] / max(1, one["models"] * labels)  # one worker, per model-label
    by = {(r["runner"], r["workers"]): r for r in runs}
    local_w = by["local", args.workers]["wall_seconds"]
    efficiency = one["wall_seconds"] / local_w / args.workers
    summary = {
        "benchmark": "audit", "environment": environment(), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "labels_per_model": labels,
        "source": str(args.zoo) if args.zoo else f"{args.train} digits nets",
        "settings": {"steps": args.steps, "clean_samples": args.clean_samples, "workers": args.workers},
        "runs": runs,
        "ratio_workers_to_one": local_w / one["wall_seconds"],
        "sequential_scans_seconds": baseline, "sequential_scans_threads": torch.get_num_threads(),
        "ratio_workers_to_sequential_scans": local_w / baseline,
        "ratio_ray_to_local": (by["ray", args.workers]["wall_seconds"] / local_w
                               if ("ray", args.workers) in by else None),
        "identical_results": all(v == scans["local", 1] for v in scans.values()),
        "cost_model": {
            "seconds_per_model_label_one_worker": s, "workers_per_node": args.workers,
            "efficiency": efficiency,
            "formula": "s × models × labels / (nodes × workers × efficiency)",
            "zoo_1000_models_hours": {str(n): s * 1000 * labels / (n * args.workers * efficiency) / 3600
                                      for n in NODES}},
    }
    write_json(args.out, summary)
    print(f"{args.workers} workers / 1: {summary['ratio_workers_to_one']:.2f}; ray / local: "
          f"{summary['ratio_ray_to_local']}; identical: {summary['identical_results']} → {args.out}")


if __name__ == "__main__":
    main()
