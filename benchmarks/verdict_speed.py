"""Seconds of the verdict (Neural Cleanse + MM-BD + the untargeted search, and with ``--decision
verdict-pairs`` the pair search) per model, on this machine.

    python benchmarks/verdict_speed.py MODEL:DATA [MODEL:DATA ...] --out bench_out/verdict_speed.json

Each model is scanned with ``scan --decision verdict`` defaults (``--precision`` as given) into a fresh
folder (no resume);
the JSON has each part's seconds, the torch thread count and the load average before the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from trojanscan.fileio import write_json
from trojanscan.workflows.records import environment
from trojanscan.workflows.scanning import scan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="MODEL:DATA pairs (a model file and a data source)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/verdict_speed.json"))
    ap.add_argument("--decision", default="verdict", choices=("verdict", "verdict-pairs"))
    ap.add_argument("--precision", default="auto", choices=("float32", "bfloat16", "auto"))
    args = ap.parse_args()
    runs = []
    for pair in args.models:
        model, _, data = pair.rpartition(":")
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            result = scan(model, data, decision=args.decision, out_dir=folder, progress=False,
                          precision=args.precision)
            wall = time.perf_counter() - start
        row = {"model": model, "data": data, "labels": len(result.labels), "wall_seconds": wall,
               "neural_cleanse_seconds": result.seconds,
               "mm_bd_seconds": result.extra["mm-bd"]["seconds"],
               "untargeted_seconds": result.extra["untargeted"]["seconds"],
               "pairs_seconds": result.extra["pairs"]["seconds"] if "pairs" in result.extra else None,
               "verdict": result.extra["verdict"]["verdict"], "precision": result.parameters["precision"],
               "load_average_before": load}
        print(row, flush=True)
        runs.append(row)
    write_json(args.out, {"benchmark": "verdict speed", "decision": args.decision,
                          "precision": args.precision, "threads": torch.get_num_threads(),
                          "environment": environment(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
