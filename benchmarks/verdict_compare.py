"""Two ``verdict_zoo.py`` results on the same models side by side: the overall figures, every model
whose verdict, targets or kind differ, and the mean seconds per architecture.

    python benchmarks/verdict_compare.py BEFORE.json AFTER.json --out bench_out/compare.json

For a change that should leave the verdict alone (another precision, another schedule) the list of
changed models is the measurement; for a rule change it is what the change did.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from trojanscan.fileio import write_json

FIGURES = ("models", "trojaned", "clean", "detected", "false_positive", "clean_called_suspicious",
           "right_target_single", "two_target_flagged_with_both", "all_to_all_flagged_as_such",
           "paper_detected", "paper_false_positive", "ratio_detected", "ratio_false_positive",
           "auroc_score", "auroc_verdict", "auroc_size_ratio")


def _answer(row: dict) -> tuple:
    return row["verdict"], row["targets"], row["kind"]


def compare(before: dict, after: dict) -> dict:
    """The figures of both, the models whose answer changed, and seconds per architecture."""
    old = {(r["zoo_seed"], r["name"]): r for r in before["models"]}
    new = {(r["zoo_seed"], r["name"]): r for r in after["models"]}
    if old.keys() != new.keys():
        raise SystemExit("the two results are not of the same models")
    changed = [{"zoo_seed": k[0], "name": k[1], "trojaned": new[k]["trojaned"],
                "before": dict(zip(("verdict", "targets", "kind"), _answer(old[k]), strict=True)),
                "after": dict(zip(("verdict", "targets", "kind"), _answer(new[k]), strict=True)),
                "score_before": old[k]["score"], "score_after": new[k]["score"]}
               for k in sorted(new) if _answer(old[k]) != _answer(new[k])]
    seconds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for k, r in new.items():
        seconds[f"{r['arch']} ({r['dataset']})"].append((old[k]["seconds"], r["seconds"]))
    return {"figures": {f: [before["summary"]["overall"].get(f), after["summary"]["overall"].get(f)]
                        for f in FIGURES},
            "changed": changed,
            "mean_seconds": {a: [sum(b for b, _ in v) / len(v), sum(x for _, x in v) / len(v), len(v)]
                             for a, v in sorted(seconds.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench_out/verdict_compare.json"))
    args = ap.parse_args()
    result = compare(*(json.loads(p.read_text()) for p in (args.before, args.after)))
    for name, (b, a) in result["figures"].items():
        print(f"{name:30s} {b!s:>22.22} {a!s:>22.22}")
    print(f"{len(result['changed'])} model(s) changed")
    for c in result["changed"]:
        print(f"  seed {c['zoo_seed']} {c['name']}: {c['before']} -> {c['after']}")
    write_json(args.out, {"benchmark": "verdict compare", "before": str(args.before),
                          "after": str(args.after), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
