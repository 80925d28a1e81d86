"""Score the combined verdict (and the paper's MAD test and the size ratio as baselines) on a zoo
built by ``trojanscan bench zoo --methods neural-cleanse,mm-bd,untargeted,perturbation`` (``pairs`` for
``--with-pairs``), from its saved scans.

    python benchmarks/verdict_zoo.py ZOO_DIR [ZOO_DIR ...] --out bench_out/verdict_zoo.json

Several zoos are pooled (the development figures of a rule come from all its development zoos).

Per model: the verdict, targets and kind; overall and per attack kind and architecture: detection
(backdoored) and false-positive rates, with 'suspicious' counted separately, and target accuracy.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from trojanscan.bench.zoo import model_file
from trojanscan.defenses.mmbd import MarginEvidence
from trojanscan.defenses.pairs import PairEvidence
from trojanscan.defenses.perturbation import PerturbationEvidence
from trojanscan.defenses.population import log_ratios, population_evidence
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.untargeted import UntargetedEvidence
from trojanscan.defenses.verdict import ALPHA, PERTURBATION_RULE, RULE_VERSION, decide
from trojanscan.fileio import write_json
from trojanscan.metrics import roc_auc
from trojanscan.models.head import pools_globally
from trojanscan.models.io import load_model


def add_population(rows: list[dict]) -> None:
    """The population-referenced size candidate (``trojanscan.defenses.population``), each zoo's models of
    one dataset held to each other, added to each row in place."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["zoo_seed"], r["dataset"])][r["name"]] = r
    for group in groups.values():
        found = population_evidence({n: r["log_ratios"] for n, r in group.items()},
                                    {n: r["mmbd_p"] for n, r in group.items()})
        for n, r in group.items():
            e = found.get(n)
            r["population_score"] = e.score if e else None
            r["population_target"] = e.target if e else None
            r["population_targets"] = e.targets if e else []


def attack_kind(spec: dict) -> str:
    """The world zoo's attack kind of a model spec (patch-corner, pixel, blend-noise, ...)."""
    attack, opts = spec.get("attack"), spec.get("attack_options") or {}
    if attack is None:
        return "clean"
    if attack == "badnets":
        if opts.get("color") == "random":
            return "patch-random"
        position = opts.get("position")
        return ("patch-center" if position == "center" else
                "patch-anywhere" if isinstance(position, list) else "patch-corner")
    if attack == "scatter":
        return "pixel" if opts.get("pixels") == 1 else "pixels"
    if attack == "blend":
        return f"blend-{opts.get('pattern')}"
    if attack == "pattern":
        return f"pattern-{opts.get('shape')}"
    return attack


def _head_pools(zoo: Path, m: dict, scan: ScanResult) -> bool | None:
    """What :func:`pools_globally` says of the zoo model's file (as ``scan`` sees it)."""
    shape = tuple(scan.labels[0].pattern.shape)
    module = load_model(model_file(zoo / "models", m), input_shape=shape).module
    return pools_globally(module, torch.zeros(1, *shape))


def _row(zoo: Path, m: dict, use_untargeted: bool, use_pairs: bool,
         dense_null: bool = True, use_perturbation: bool = True, depthwise_null: bool = True,
         head_null: bool = True) -> dict | None:
    """One model's verdict from its saved evidence: the untargeted map and/or the pair search as asked
    (rule 4 is the pairs without the map; rule 5 without ``dense_null``, the MLPs' own size null; rule 6
    without ``depthwise_null``, the MobileNets' own ratio null; rule 7 with ``use_perturbation``, the
    universal perturbations' ratio; rule 8 without ``head_null``, the heads' own ratio nulls, whose
    kind is read from the model file)."""
    scans = sorted(glob.glob(str(zoo / "scans" / m["key"] / "neural-cleanse-*")))
    evidence = m.get("evidence", {})
    needed = ({"mm-bd"} | ({"untargeted"} if use_untargeted else set()) | ({"pairs"} if use_pairs else set())
              | ({"perturbation"} if use_perturbation else set()))
    if not scans or not needed <= set(evidence):
        return None
    scan = ScanResult.load(scans[0])
    mm = evidence["mm-bd"]["evidence"]
    untargeted = UntargetedEvidence.from_dict(evidence["untargeted"]["evidence"]) if use_untargeted else None
    pairs = PairEvidence.from_dict(evidence["pairs"]["evidence"]) if use_pairs else None
    push = PerturbationEvidence.from_dict(evidence["perturbation"]["evidence"]) if use_perturbation else None
    pooled = _head_pools(zoo, m, scan) if head_null else None
    verdict = decide(scan, MarginEvidence(mm["statistics"], mm["p_value"], mm["flagged_labels"], mm["null"]),
                     pairs, untargeted, dense=dense_null and m.get("arch") == "mlp", perturbation=push,
                     depthwise=depthwise_null and m.get("arch") == "mobilenet-small", pooled=pooled)
    spec = m["spec"]
    return {"name": m["name"], "trojaned": m["trojaned"], "attack": attack_kind(spec),
            "dataset": spec["dataset"], "arch": m.get("arch"), "normalised": bool(spec.get("normalised")),
            "target": m["target"],
            "true_targets": m.get("targets") or ([m["target"]] if m["trojaned"] else []),
            "asr": m["attack_success_rate"],
            "attack_took": (not m["trojaned"]) or (m["attack_success_rate"] or 0) >= 0.5,
            "verdict": verdict.verdict, "targets": verdict.targets, "kind": verdict.kind,
            "head_pools": pooled,
            "score": verdict.score,
            "paper_flagged": scan.flagged_labels, "size_ratio": scan.size_ratio,
            "anomaly_index": scan.anomaly_index,
            "log_ratios": log_ratios([r.l1_norm for r in sorted(scan.labels, key=lambda r: r.label)]),
            "mmbd_p": mm["p_value"], "untargeted_spread": untargeted.spread if untargeted else None,
            "perturbation_ratio": push.ratio if push else None,
            "perturbation_smallest": push.smallest if push else None,
            "seconds": scan.seconds + sum(evidence[k]["seconds"] for k, used in (
                ("mm-bd", True), ("untargeted", untargeted), ("pairs", pairs), ("perturbation", push))
                if used)}


def _rates(rows: list[dict]) -> dict:
    bad = [r for r in rows if r["trojaned"]]
    good = [r for r in rows if not r["trojaned"]]

    def share(rs: list[dict], test) -> float | None:
        return sum(bool(test(r)) for r in rs) / len(rs) if rs else None

    single = [r for r in bad if r["attack"] not in ("all-to-all", "two-target")]
    two = [r for r in bad if r["attack"] == "two-target"]
    a2a = [r for r in bad if r["attack"] == "all-to-all"]
    return {"models": len(rows), "trojaned": len(bad), "clean": len(good),
            "detected": share(bad, lambda r: r["verdict"] == "backdoored"),
            "detected_or_suspicious": share(bad, lambda r: r["verdict"] != "clean"),
            "false_positive": share(good, lambda r: r["verdict"] == "backdoored"),
            "clean_called_suspicious": share(good, lambda r: r["verdict"] == "suspicious"),
            "right_target_single": share(single, lambda r: r["target"] in r["targets"]),
            "two_target_flagged_with_both": share(two, lambda r: r["verdict"] == "backdoored"
                                                  and set(r["true_targets"]) <= set(r["targets"])),
            "all_to_all_flagged_as_such": share(a2a, lambda r: r["verdict"] == "backdoored"
                                                and r["kind"] == "all-to-all"),
            "other_called_all_to_all": share([r for r in bad if r not in a2a],
                                             lambda r: r["kind"] == "all-to-all"),
            "clean_called_all_to_all": share(good, lambda r: r["kind"] == "all-to-all"),
            "paper_detected": share(bad, lambda r: bool(r["paper_flagged"])),
            "paper_false_positive": share(good, lambda r: bool(r["paper_flagged"])),
            "ratio_detected": share(bad, lambda r: r["size_ratio"] < 0.4),
            "ratio_false_positive": share(good, lambda r: r["size_ratio"] < 0.4),
            "auroc_score": roc_auc([-r["score"] for r in rows], [r["trojaned"] for r in rows])
            if bad and good else None,
            # the verdict's own order: an all-to-all pattern (whatever the score) first, then the score
            "auroc_verdict": roc_auc([1.0 if r["kind"] == "all-to-all" else -r["score"] for r in rows],
                                     [r["trojaned"] for r in rows]) if bad and good else None,
            "auroc_paper_index": roc_auc([r["anomaly_index"] for r in rows], [r["trojaned"] for r in rows])
            if bad and good else None,
            "auroc_size_ratio": roc_auc([-r["size_ratio"] for r in rows], [r["trojaned"] for r in rows])
            if bad and good else None,
            "auroc_perturbation_ratio": roc_auc([-r["perturbation_ratio"] for r in rows],
                                                [r["trojaned"] for r in rows])
            if bad and good and all(r["perturbation_ratio"] is not None for r in rows) else None,
            **_population_rates(bad, good, single, two, share),
            "mean_seconds": sum(r["seconds"] for r in rows) / len(rows) if rows else None}


def _population_rates(bad: list[dict], good: list[dict], single: list[dict], two: list[dict], share) -> dict:
    scored = [r for r in bad + good if r.get("population_score") is not None]
    flagged = lambda r: r.get("population_score") is not None and r["population_score"] < ALPHA  # noqa: E731
    both = any(r["trojaned"] for r in scored) and any(not r["trojaned"] for r in scored)
    return {"population_scored": len(scored),
            "population_detected": share(bad, flagged),
            "population_false_positive": share(good, flagged),
            "population_two_target_flagged_with_both": share(two, lambda r: flagged(r) and set(
                r["true_targets"]) <= set(r["population_targets"])),
            "population_single_with_a_wrong_extra_target": share(single, lambda r: flagged(r) and bool(
                set(r["population_targets"]) - set(r["true_targets"]))),
            "population_right_target_single": share(single,
                                                    lambda r: r.get("population_target") == r["target"]),
            "auroc_population": roc_auc([-r["population_score"] for r in scored],
                                        [r["trojaned"] for r in scored]) if both else None}


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("bench_out/verdict_zoo.json"))
    ap.add_argument("--no-untargeted", action="store_true",
                    help="rule 4: the pair search's evidence, not the untargeted trigger's "
                    "(zoos scanned before it)")
    ap.add_argument("--with-pairs", action="store_true",
                    help="add the pair search's evidence (scan --decision verdict-pairs)")
    ap.add_argument("--no-dense-null", action="store_true",
                    help="rule 5: MLPs held to the convolutional nets' size-ratio null (and no head nulls)")
    ap.add_argument("--no-perturbation", action="store_true",
                    help="without the universal perturbations' evidence (zoos scanned before it)")
    ap.add_argument("--no-depthwise-null", action="store_true",
                    help="rule 6: MobileNets held to the other convolutional nets' size-ratio null "
                    "(and no head nulls)")
    ap.add_argument("--no-head-null", action="store_true",
                    help="rule 8: other convolutional nets held to one size-ratio null, whatever their head")
    args = ap.parse_args()
    use_untargeted = not args.no_untargeted
    use_pairs = args.with_pairs or args.no_untargeted
    head_null = not (args.no_head_null or args.no_depthwise_null or args.no_dense_null)  # the older rules
    rows, seeds = [], []
    for zoo in args.zoo:
        results = json.loads((zoo / "results.json").read_text())
        seeds.append(results["options"]["seed"])
        rows += [{**r, "zoo_seed": seeds[-1]} for m in results["models"]
                 if (r := _row(zoo, m, use_untargeted, use_pairs, not args.no_dense_null,
                               not args.no_perturbation, not args.no_depthwise_null, head_null)) is not None]
    usable = [r for r in rows if r["attack_took"]]
    add_population(usable)
    by: dict[str, dict] = {"overall": _rates(usable)}
    for key in ("attack", "arch", "dataset"):
        groups = defaultdict(list)
        for r in usable:
            groups[str(r[key])].append(r)
        by[f"by_{key}"] = {k: _rates(v) for k, v in sorted(groups.items())}
    rule = (5 if args.no_dense_null else 6 if args.no_depthwise_null
            else PERTURBATION_RULE if not args.no_perturbation else 8 if args.no_head_null else RULE_VERSION)
    write_json(args.out, {"benchmark": "verdict", "rule_version": rule, "untargeted": use_untargeted,
                          "pairs": use_pairs, "dense_null": not args.no_dense_null,
                          "perturbation": not args.no_perturbation,
                          "depthwise_null": not args.no_depthwise_null, "head_null": head_null,
                          "zoos": [str(z) for z in args.zoo], "zoo_seeds": seeds,
                          "left_out_attack_did_not_take": [r["name"] for r in rows if not r["attack_took"]],
                          "summary": by, "models": rows})
    for r in rows:
        print(f"{r['name'][:44]:44s} {r['verdict']:10s} {r['targets']!s:12s} {r['kind']!s:15s} "
              f"true {r['true_targets']!s:8s} score {r['score']:.2g} paper {r['paper_flagged']} "
              f"ratio {r['size_ratio']:.2f} "
              f"mmbd {r['mmbd_p']:.3f} push {_or_nan(r['perturbation_ratio']):.2f} "
              f"population {_or_nan(r.get('population_score')):.2g}")
    print(json.dumps(by["overall"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
