"""Neural Cleanse and TABOR side by side on models where Neural Cleanse struggles, and on clean ones.

    python benchmarks/tabor_bench.py --out bench_out/tabor_bench.json

Models (from ``benchmarks/train_zoo.py``): an 8×8 patch, a patch in the image centre, 16 scattered
pixels and a blended trigger on GTSRB; clean GTSRB and MNIST models for false positives. Per model
and method: verdict, whether the true target is flagged, IoU of the reversed trigger with the real
one (top-|trigger| pixels), the TABOR quality outliers, scan seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from scan_bench import scan_one

from trojanscan.fileio import write_json

MODELS = ["gtsrb-badnets8", "gtsrb-center", "gtsrb-scatter", "gtsrb-blend", "gtsrb-badnets",
          "gtsrb-clean", "mnist-badnets", "mnist-clean", "mnist-clean-seed1"]
METHODS = ["neural-cleanse", "tabor"]
KEYS = ("infected", "flagged_labels", "anomaly_index", "target_flagged", "iou", "reversed_l1",
        "true_area", "quality_flagged_labels", "quality_anomaly_index", "scan_seconds", "correct")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/models"))
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--clean-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out/tabor_bench.json"))
    args = ap.parse_args(argv)
    table = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
    for name in args.models:
        path = args.models_dir / f"{name}.safetensors"
        if not path.is_file():
            print(f"{path}: missing; train it with benchmarks/train_zoo.py", file=sys.stderr)
            return 2
        for method in args.methods:
            out_dir = args.out.parent / "scans" / f"{name}-{method}-default-chunk10"
            rec = scan_one(path, name.split("-")[0], "default", 10, args.clean_samples, args.seed,
                           out_dir, method=method)
            table.setdefault(name, {})[method] = {k: rec.get(k) for k in KEYS}
            print(json.dumps({"model": name, "method": method, **table[name][method]}), flush=True)
            write_json(args.out, {"benchmark": "tabor-vs-neural-cleanse", "schedule": "default",
                                  "threads": torch.get_num_threads(), "models": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
