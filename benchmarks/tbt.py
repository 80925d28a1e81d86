"""TBT (targeted bit trojan) on the reference nets: accuracy before and after, ASR and bit flips per w_b.

    python benchmarks/tbt.py --data mnist,gtsrb --wb 10,50,150 --out bench_out/tbt.json

Per dataset one clean reference net is trained (``--epochs``, ``--train-samples``), then TBT runs
with each ``w_b``, trigger position and insertion (``--insertions sgd,bit-search``) on a copy of it.
Figures are on the test split, which the attack never sees (its one batch comes from the training
split). Set ``TROJANSCAN_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from trojanscan import load_dataset, train_classifier
from trojanscan.attacks import TBT
from trojanscan.fileio import write_json
from trojanscan.workflows.records import environment


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist,gtsrb")
    ap.add_argument("--wb", default="10,50,150")
    ap.add_argument("--positions", default="bottom-right,center")
    ap.add_argument("--insertions", default="sgd", help="sgd (the paper's), bit-search, or both")
    ap.add_argument("--max-flips", type=int, default=100, help="the bit search's budget")
    ap.add_argument("--target", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench_out/tbt.json"))
    args = ap.parse_args()
    rows = []
    for source in args.data.split(","):
        data = load_dataset(source)
        if args.train_samples and args.train_samples < len(data.x_train):
            idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
            data = dataclasses.replace(data, x_train=data.x_train[idx[:args.train_samples]],
                                       y_train=data.y_train[idx[:args.train_samples]])
        start = time.perf_counter()
        clean = train_classifier(data, None, epochs=args.epochs, seed=0, progress=False)
        train_seconds = time.perf_counter() - start
        for position in args.positions.split(","):
            runs = [(i, int(w)) for i in args.insertions.split(",") for w in args.wb.split(",")]
            for insertion, wb in runs:
                attack = TBT(target=args.target, wb=wb, position=position, insertion=insertion,
                             max_flips=args.max_flips)
                start = time.perf_counter()
                attack.apply(clean.model, data)
                r = attack.report_
                row = {"data": source, "arch": type(clean.model).__name__, "position": position,
                       "insertion": insertion, "wb": wb,
                       "float_clean_accuracy": r["float_clean_accuracy"],
                       "int8_clean_accuracy": r["before"]["clean_accuracy"],
                       "asr_before": r["before"]["attack_success_rate"],
                       "clean_accuracy_after": r["after"]["clean_accuracy"],
                       "asr_after": r["after"]["attack_success_rate"], "bit_flips": r["bit_flips"],
                       "weights_changed": r["weights_changed"], "weights_total": r["weights_total"],
                       "patch_pixels": r["patch_pixels"], "seconds": time.perf_counter() - start,
                       "clean_train_seconds": train_seconds}
                rows.append(row)
                print(f"{source:8s} {position:12s} {insertion:10s} wb {wb:4d}: "
                      f"CA {row['int8_clean_accuracy']:.4f} → "
                      f"{row['clean_accuracy_after']:.4f}, ASR {row['asr_after']:.4f}, "
                      f"{row['bit_flips']} flips in {row['weights_changed']} weights, "
                      f"{row['seconds']:.0f} s", flush=True)
                write_json(args.out, {"benchmark": "tbt", "options": vars(args) | {"out": str(args.out)},
                                      "environment": environment(), "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
