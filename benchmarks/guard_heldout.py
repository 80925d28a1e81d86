"""The combined run-time guard on models it was never tuned on: every trojaned model of a world zoo
(``trojanscan bench zoo --preset world``: MLP, residual and depthwise nets, normalised inputs, patches,
pixels, blends, two-target and all-to-all backdoors), with the guard's default settings.
Models whose attack did not take (ASR < 50%) are left out, as in the verdict benchmark.

    python benchmarks/guard_heldout.py ZOO_DIR --out benchmarks/results/guard_heldout_seed400.json

The guard's settings (detectors, calibration, FRR split) were chosen on ``guard_bench.py``'s six
reference-architecture models; this measures them once on other models. Per model: FAR/FRR of the
guard and of each detector inside it, for both calibration sets (see ``guard_bench.py``). ``far`` is
over every stamped input, as ``guard evaluate`` counts it; ``far_effective`` only over the stamped
inputs the model sends to the attacker's label (the trojaned inputs proper: an attack with 90% ASR
leaves 10% of stamped inputs that a guard rightly lets through).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trojanscan.api import guard_evaluate
from trojanscan.bench.zoo_scores import attack_took
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.guard import DEFAULT_DETECTORS, joint_thresholds
from trojanscan.defenses.ibd_psc import norm_layers
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import write_json
from trojanscan.models.io import load_model
from trojanscan.workflows.guarding import evaluation_inputs, stamped_labels
from trojanscan.workflows.inputs import as_dataset

GOAL = {"far": 0.02, "frr": 0.02}
DATASETS = {"mnist": "mnist", "fashion-mnist": "fashion_mnist", "gtsrb": "gtsrb"}


def _row(zoo: Path, m: dict[str, Any], split: str, samples: int, options: dict[str, Any],
         ibd_psc: bool, subsets: list[tuple[str, ...]]) -> dict[str, Any]:
    record = json.loads((zoo / "models" / f"{m['key']}.json").read_text())
    start = time.perf_counter()
    dataset = as_dataset(DATASETS[m["spec"]["dataset"]])
    trigger = Trigger.load(zoo / "models" / f"{m['key']}.trigger.npz")
    model = zoo / "models" / m["model_file"]
    if ibd_psc and norm_layers(load_model(model, input_shape=dataset.input_shape).module):
        options = {**options, "detectors": (*options.get("detectors", DEFAULT_DETECTORS), "ibd-psc")}
    evaluation = guard_evaluate(model, dataset, trigger, samples=samples,
                                calibration_samples=samples, calibration_split=split, frr=0.01,
                                throughput_inputs=8, mean=record.get("mean"), std=record.get("std"),
                                progress=False, **options)
    ev = evaluation.to_dict()
    hit = _reaching_target(evaluation.guard, dataset, trigger, samples, ev["seed"])
    flags = evaluation.guard.decide(evaluation.trojaned_scores)  # as predict() flags them (tested)
    return {"far": ev["far"], "frr": ev["frr"], "stamped_reaching_target": float(hit.float().mean()),
            "far_effective": _missed(flags, hit), "seconds": time.perf_counter() - start,
            "detectors": {k: {"far": d["in_guard"]["far"], "frr": d["in_guard"]["frr"], "auroc": d["auroc"]}
                          for k, d in ev["detectors"].items()},
            "subsets": {"+".join(sub): _subset(evaluation, sub, hit) for sub in subsets
                        if set(sub) <= set(evaluation.guard.detectors)},
            "meets_goal": ev["far"] <= GOAL["far"] and ev["frr"] <= GOAL["frr"]}


def _reaching_target(guard: Any, dataset: Any, trigger: Trigger, samples: int, seed: int) -> torch.Tensor:
    """Which stamped inputs of ``evaluation_inputs``' draw the model sends to the attacker's label."""
    _, stamped = evaluation_inputs(dataset, trigger, samples, seed)
    y = stamped_labels(dataset, trigger, samples, seed)
    # a multi-target trigger's parts stamp in turn, each with its own target
    return guard.labels(stamped) == trigger.intended_in_turn(y)


def _missed(flags: torch.Tensor, hit: torch.Tensor) -> float:
    return float((~flags[hit]).float().mean()) if hit.any() else float("nan")


def _subset(evaluation: Any, members: tuple[str, ...], hit: torch.Tensor) -> dict[str, Any]:
    """The OR rule of only ``members``, calibrated afresh on their benign scores for the same FRR: what
    a guard of those members alone decides on the same inputs (its scores are the same)."""
    guard = evaluation.guard
    thresholds, _ = joint_thresholds({m: guard.calibration_scores_[m] for m in members}, guard.frr)

    def flag(scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([scores[m].double() > thresholds[m] for m in members]).any(0)

    benign, stamped = flag(evaluation.benign_scores), flag(evaluation.trojaned_scores)
    far, frr = float((~stamped).float().mean()), float(benign.float().mean())
    return {"far": far, "frr": frr, "far_effective": _missed(stamped, hit),
            "meets_goal": far <= GOAL["far"] and frr <= GOAL["frr"]}


def _meets(run: dict[str, Any], far: str) -> bool:
    return run.get(far, 1.0) <= GOAL["far"] and run.get("frr", 1.0) <= GOAL["frr"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--splits", nargs="*", default=["train", "test"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                    help="a guard option other than the default, its value as JSON (severity=4, "
                         "deviation=\"std\", detectors=[\"strip\",\"teco\"])")
    ap.add_argument("--ibd-psc", action="store_true", help="add IBD-PSC to the guard of batch-norm nets")
    ap.add_argument("--attacks", help="only models of these attack kinds (comma-separated)")
    ap.add_argument("--subset", action="append", default=[], metavar="A,B",
                    help="also the OR rule of only these members, recalibrated on their benign scores "
                         "(strip,teco: the guard before layer k-NN); repeatable")
    args = ap.parse_args(argv)
    subsets = [tuple(s.split(",")) for s in args.subset]
    options = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.option)}
    results = json.loads((args.zoo / "results.json").read_text())
    rows = []
    for m in results["models"]:
        if not m["trojaned"] or not attack_took(m) or (
                args.attacks and m["spec"]["attack"] not in args.attacks.split(",")):
            continue
        row = {"name": m["name"], "arch": m.get("arch"), "dataset": m["spec"]["dataset"],
               "attack": m["spec"]["attack"], "attack_options": m["spec"].get("attack_options"),
               "normalised": bool(m["spec"].get("normalised")), "asr": m.get("attack_success_rate")}
        for split in args.splits:
            try:
                row[split] = _row(args.zoo, m, split, args.samples, options, args.ibd_psc, subsets)
            except TrojanscanError as e:
                row[split] = {"error": str(e)}
            shown = {k: row[split].get(k) for k in ("far", "far_effective", "frr", "error")}
            print(json.dumps({"model": m["name"], split: shown}), flush=True)
        rows.append(row)
        summary = {s: {"models": sum(1 for r in rows if "far" in r[s]),
                       "meets_goal": sum(1 for r in rows if r[s].get("meets_goal")),
                       "meets_goal_effective": sum(1 for r in rows if _meets(r[s], "far_effective")),
                       "errors": sum(1 for r in rows if "error" in r[s]),
                       "subsets": {"+".join(sub): {
                           "meets_goal": sum(1 for r in rows if r[s].get("subsets", {}).get("+".join(sub), {})
                                             .get("meets_goal")),
                           "meets_goal_effective": sum(1 for r in rows if _meets(
                               r[s].get("subsets", {}).get("+".join(sub), {}), "far_effective"))}
                           for sub in subsets}} for s in args.splits}
        write_json(args.out, {"benchmark": "guard-heldout", "zoo": str(args.zoo), "goal": GOAL,
                              "options": options, "ibd_psc_on_batch_norm_nets": args.ibd_psc,
                              "samples": args.samples, "target_frr": 0.01, "summary": summary,
                              "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
