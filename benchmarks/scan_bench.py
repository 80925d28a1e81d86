"""Scan the benchmark models with Neural Cleanse and record verdicts, trigger overlap and cost.

    python benchmarks/scan_bench.py --out bench_out/scan_bench.json                  # default schedule
    python benchmarks/scan_bench.py --models mnist-badnets --schedule paper           # the authors'
    python benchmarks/scan_bench.py --models mnist-badnets --chunks 1 5 10            # chunk scaling

The models come from ``benchmarks/train_zoo.py`` (``--models-dir``); the clean data is a seeded
subset of each dataset's test split. Per model: verdict, flagged labels, anomaly index, whether
the true target is flagged, reversed L1 vs the real trigger's area, IoU of the top-|trigger| mask
pixels with the real trigger, seconds and image passes (total and per label).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from trojanscan.api import scan
from trojanscan.fileio import write_json


def scan_one(model_path: Path, dataset: str, schedule: str, chunk: int, clean_samples: int,
             seed: int, out_dir: Path, method: str = "neural-cleanse") -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh scan, not a resumed one, for honest timing
    start = time.perf_counter()
    result = scan(model_path, dataset, method=method, schedule=schedule, chunk=chunk,
                  clean_samples=clean_samples, seed=seed, out_dir=out_dir, progress=False)
    wall = time.perf_counter() - start
    truth = result.extra.get("ground_truth")
    labels = result.labels
    record = {
        "model": model_path.stem, "dataset": dataset, "method": method, "schedule": schedule,
        "chunk": chunk,
        "clean_samples": clean_samples, "seed": seed,
        "infected": result.infected, "flagged_labels": result.flagged_labels,
        "anomaly_index": result.anomaly_index, "median_l1": result.median_l1,
        "scan_seconds": result.seconds, "wall_seconds": wall,
        "image_passes": result.image_passes,
        "seconds_per_label": statistics.mean(r.seconds for r in labels),
        "image_passes_per_label": statistics.mean(r.image_passes for r in labels),
        "steps_per_label": statistics.mean(r.steps for r in labels),
        "label_l1": [r.l1_norm for r in labels],
        "not_converged": [r.label for r in labels if not r.converged],
        "clean_accuracy_on_scan_data": result.clean_accuracy,
        "out_dir": str(out_dir),
    }
    if "quality" in result.extra:  # TABOR's quality-metric outliers, beside the L1 verdict
        record["quality_flagged_labels"] = result.extra["quality"].get("flagged_labels")
        record["quality_anomaly_index"] = result.extra["quality"].get("anomaly_index")
    if truth:
        record.update({
            "true_target": truth["target"], "true_area": truth["area"],
            "target_flagged": truth["target_flagged"],
            "target_anomaly_index": truth.get("target_anomaly_index"),
            "reversed_l1": truth.get("reversed_l1"),
            "l1_within_area": truth.get("reversed_l1", float("inf")) <= truth["area"],
            "iou": truth.get("overlap", {}).get("iou"),
        })
        record["correct"] = bool(truth["target_flagged"] and result.anomaly_index > 2)
    else:
        record["correct"] = not result.infected
    return record


def chunk_agreement(runs: list[dict]) -> dict[str, dict]:
    """Per model and schedule: the largest per-label L1 difference between chunk sizes, and on how
    many labels they differ at all (the CPU kernels round differently for other batch sizes)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "label_l1" in r:
            groups.setdefault(f"{r['model']}@{r['schedule']}/seed{r['seed']}", []).append(r)
    out = {}
    for key, rows in groups.items():
        if len(rows) < 2:
            continue
        ref = max(rows, key=lambda r: r["chunk"])
        diffs = {r["chunk"]: [abs(a - b) for a, b in zip(r["label_l1"], ref["label_l1"], strict=True)]
                 for r in rows if r is not ref}
        out[key] = {"reference_chunk": ref["chunk"],
                    "max_l1_difference": {c: max(d) for c, d in diffs.items()},
                    "labels_differing": {c: sum(v > 0 for v in d) for c, d in diffs.items()},
                    "same_flagged": all(r["flagged_labels"] == ref["flagged_labels"] for r in rows)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/models"))
    ap.add_argument("--models", nargs="*", default=["mnist-badnets", "mnist-clean", "gtsrb-badnets",
                                                    "gtsrb-clean"])
    ap.add_argument("--schedule", default="default", choices=["default", "paper"])
    ap.add_argument("--chunks", nargs="*", type=int, default=[10])
    ap.add_argument("--clean-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out/scan_bench.json"))
    args = ap.parse_args(argv)
    runs = []
    if args.out.exists():  # several invocations accumulate into one file
        runs = json.loads(args.out.read_text()).get("runs", [])
    for name in args.models:
        path = args.models_dir / f"{name}.safetensors"
        if not path.is_file():
            print(f"{path}: missing; train it with benchmarks/train_zoo.py", file=sys.stderr)
            return 2
        dataset = name.split("-")[0]
        for chunk in args.chunks:
            out_dir = args.out.parent / "scans" / f"{name}-{args.schedule}-chunk{chunk}"
            rec = scan_one(path, dataset, args.schedule, chunk, args.clean_samples, args.seed,
                           out_dir)
            runs = [r for r in runs if (r["model"], r["schedule"], r["chunk"], r["seed"]) !=
                    (name, args.schedule, chunk, args.seed)] + [rec]
            print(json.dumps({k: rec.get(k) for k in (
                "model", "schedule", "chunk", "flagged_labels", "anomaly_index", "iou",
                "reversed_l1", "scan_seconds", "image_passes", "correct")}), flush=True)
            write_json(args.out, {"benchmark": "scan", "threads": torch.get_num_threads(),
                                  "runs": runs, "chunk_agreement": chunk_agreement(runs)})
    return 0 if all(r["correct"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
