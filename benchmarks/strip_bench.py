"""STRIP on the benchmark's trojaned models: FAR at a target FRR, and throughput.

    python benchmarks/strip_bench.py --out bench_out/strip_bench.json

Per model: N = 100 copies, 2,000 benign and 2,000 trigger-stamped test inputs, calibration on
2,000 benign training images, boundary for FRR 1% (the authors' normal fit); throughput for
N = 10 and 100 against plain inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trojanscan.api import strip_evaluate
from trojanscan.fileio import write_json

MODELS = {"mnist-badnets": ("mnist", 0.02), "gtsrb-badnets": ("gtsrb", 0.01),
          "gtsrb-blend": ("gtsrb", 0.01)}  # name → (dataset, FAR goal at FRR 1%)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/models"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("bench_out/strip_bench.json"))
    args = ap.parse_args(argv)
    results = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
    for name in args.models:
        dataset, goal = MODELS[name]
        path = args.models_dir / f"{name}.safetensors"
        if not path.is_file():
            print(f"{path}: missing; train it with benchmarks/train_zoo.py", file=sys.stderr)
            return 2
        record = strip_evaluate(path, dataset, n=args.n, samples=args.samples,
                                calibration_samples=2000, frr=0.01,
                                out_dir=args.out.parent / "strip" / name)
        record["far_goal"] = goal
        record["meets_goal"] = record["far"] <= goal
        results[name] = record
        print(json.dumps({"model": name, "frr": record["frr"], "far": record["far"],
                          "throughput": record["throughput"]}), flush=True)
        write_json(args.out, {"benchmark": "strip", "threads": torch.get_num_threads(),
                              "models": results})
    return 0 if all(r["meets_goal"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
