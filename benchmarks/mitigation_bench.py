"""Neural Cleanse mitigation on the benchmark's BadNets models: input filter, pruning, unlearning.

    python benchmarks/mitigation_bench.py --out bench_out/mitigation_bench.json

Per model (from ``benchmarks/train_zoo.py``), with the reversed trigger of its default-schedule scan
(``bench_out/scans/<model>-default-chunk10``, scanned here when missing):
- filter at 5% FPR: FPR on clean test images, FNR on test images stamped with the reversed and the
  real trigger (goal FNR < 2%);
- pruning with the default stop (reversed-trigger ASR < 1% on held-out images) and a strict one
  (< 0.1%): CA and real-trigger ASR after, fraction pruned (goal: real ASR < 1%, CA cost reported);
- unlearning with the paper's settings, and the clean-only and real-trigger baselines
  (goal: real ASR < 1%, CA drop < 1 point on MNIST, < 3 on GTSRB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trojanscan.api import build_filter, repair, scan
from trojanscan.fileio import write_json

MODELS = {"mnist-badnets": ("mnist", 1.0), "gtsrb-badnets": ("gtsrb", 3.0)}  # → (data, max CA drop)


def _scan_dir(scans: Path, name: str, dataset: str, model: Path) -> Path:
    out = scans / f"{name}-default-chunk10"
    if not (out / "scan.json").is_file():
        scan(model, dataset, out_dir=out, progress=False)
    return out


def bench_model(name: str, dataset: str, max_drop: float, models_dir: Path, scans: Path,
                out_dir: Path) -> dict:
    model = models_dir / f"{name}.safetensors"
    scan_dir = _scan_dir(scans, name, dataset, model)
    filt = build_filter(model, scan_dir, dataset, out=out_dir / f"{name}.filter.npz")[1].to_dict()
    # max_accuracy_drop=None: the README's table measures pruning without the accuracy budget
    prune_default = repair(model, scan_dir, dataset, method="prune", progress=False, max_accuracy_drop=None,
                           out=out_dir / f"{name}.pruned.safetensors").to_dict()
    prune_strict = repair(model, scan_dir, dataset, method="prune", asr_threshold=0.001, progress=False,
                          max_accuracy_drop=None,
                          publish=False).to_dict()
    unl = repair(model, scan_dir, dataset, method="unlearn", baselines=True, progress=False,
                 out=out_dir / f"{name}.unlearned.safetensors").to_dict()
    drop = 100 * (unl["before"]["clean_accuracy"] - unl["after"]["clean_accuracy"])
    goals = {
        "filter_fnr_real_below_2pct": filt["filter"]["fnr_real"] < 0.02,
        "prune_real_asr_below_1pct": prune_default["after"]["real_asr"] < 0.01,
        "prune_strict_real_asr_below_1pct": prune_strict["after"]["real_asr"] < 0.01,
        "unlearn_real_asr_below_1pct": unl["after"]["real_asr"] < 0.01,
        f"unlearn_ca_drop_below_{max_drop:g}_points": drop < max_drop,
    }
    return {"filter": filt, "prune": prune_default, "prune_strict": prune_strict, "unlearn": unl,
            "unlearn_ca_drop_points": drop, "goals": goals,
            "summary": {
                "filter FPR / FNR reversed / FNR real": [
                    filt["filter"]["fpr"], filt["filter"]["fnr_reversed"], filt["filter"]["fnr_real"]],
                "prune fraction / CA / real ASR": [prune_default["pruning"]["fraction"],
                                                   prune_default["after"]["clean_accuracy"],
                                                   prune_default["after"]["real_asr"]],
                "prune strict fraction / CA / real ASR": [prune_strict["pruning"]["fraction"],
                                                          prune_strict["after"]["clean_accuracy"],
                                                          prune_strict["after"]["real_asr"]],
                "unlearn CA / real ASR": [unl["after"]["clean_accuracy"], unl["after"]["real_asr"]],
                "before CA / real ASR": [unl["before"]["clean_accuracy"], unl["before"]["real_asr"]]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/models"))
    ap.add_argument("--scans-dir", type=Path, default=Path("bench_out/scans"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path, default=Path("bench_out/mitigation_bench.json"))
    args = ap.parse_args(argv)
    results = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
    for name in args.models:
        dataset, max_drop = MODELS[name]
        if not (args.models_dir / f"{name}.safetensors").is_file():
            print(f"{args.models_dir / name}.safetensors: missing; train it with benchmarks/train_zoo.py",
                  file=sys.stderr)
            return 2
        results[name] = bench_model(name, dataset, max_drop, args.models_dir, args.scans_dir,
                                    args.out.parent / "mitigation")
        print(json.dumps({"model": name, **results[name]["summary"], "goals": results[name]["goals"]}),
              flush=True)
        write_json(args.out, {"benchmark": "mitigation", "threads": torch.get_num_threads(),
                              "models": results})
    return 0 if all(all(r["goals"].values()) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
