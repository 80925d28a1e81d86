"""The defence table: every defence against every attack of the source material, on one model each.

    python benchmarks/defence_table.py --data mnist --out benchmarks/results/defence_table_mnist.json

Per dataset: the clean reference net of ``benchmarks/trojannn.py`` (``--clean-dir``, trained there when
missing), the poisoned models of ``benchmarks/train_zoo.py`` (``--models-dir``: BadNets, the 4-pixel
pattern, label-consistent and SIG, each where it was trained), and the model attacks made
here from the clean net with ``attack_model`` (TrojanNN square/watermark × reverse-engineered/real
retraining data; the transfer-learning backdoor when it is registered; TBT with 50 weights), each saved
with its trigger in ``--work``. For each attacked model, with the trigger the attacker used:

- detection: Neural Cleanse (MAD > 2: flagged, right target) and the combined verdict, from one scan
  with ``decision="verdict"`` (so the paper's answer and the verdict see the same triggers);
- identification: overlap (IoU) of the target's reversed mask with the real one;
- mitigation as the paper measures it, given the right target (``labels=[target]``, so a missed
  detection does not hide how the repair would fare): the input filter's FNR on real-trigger inputs
  at 5% FPR, pruning (default stop, no accuracy budget) and unlearning (real-trigger ASR and CA after);
- Fine-Pruning and the autoencoder guard, as ``benchmarks/trojannn.py`` measures them;
- STRIP's FAR at FRR 1% (1,000 benign and 1,000 stamped test inputs).

Set ``TROJANSCAN_DATA_DIR``; run with ``OMP_NUM_THREADS=1``. Slow: minutes per model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trojanscan.api import attack_model, build_filter, load_dataset, repair, scan, strip_evaluate
from trojanscan.attacks import ATTACKS
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.fileio import write_json
from trojanscan.models import load_model
from trojanscan.workflows.records import environment

HERE = Path(__file__).resolve().parent
TARGET = 3  # the model attacks' target (trojannn.py's default)
# rows whose models are trained poisoned by benchmarks/train_zoo.py (``--models-dir``), where present
POISONED_ROWS = ("badnets", "pattern", "label-consistent", "sig")


def _trojannn_bench() -> Any:
    """benchmarks/trojannn.py as a module: its clean reference nets and its Fine-Pruning/autoencoder row."""
    spec = importlib.util.spec_from_file_location("trojannn_bench", HERE / "trojannn.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def model_attacks() -> dict[str, tuple[str, dict[str, Any]]]:
    """Row name → (registered model attack, options); the transfer backdoor only where it exists."""
    rows = {f"trojannn-{mask}-{source}": ("trojannn", {"target": TARGET, "mask": mask, "data_source": source})
            for mask in ("square", "watermark") for source in ("reversed", "real")}
    if "transfer" in ATTACKS:
        rows["transfer"] = ("transfer", {"target": TARGET})
    rows["tbt-50"] = ("tbt", {"target": TARGET, "wb": 50})
    rows["tbt-bits-150"] = ("tbt", {"target": TARGET, "wb": 150, "insertion": "bit-search"})
    return rows


def attacked_models(source: str, args: argparse.Namespace, bench: Any) -> dict[str, Path]:
    """Every attacked model of ``source`` on disk (made here when missing), by row name."""
    data = load_dataset(source)
    clean = args.clean_dir / f"{source}-clean.safetensors"
    if not clean.is_file():
        bench.clean_model(source, data, args.clean_dir)
    models: dict[str, Path] = {}
    for name in POISONED_ROWS:
        if args.rows and name not in args.rows:
            continue
        trained = args.models_dir / f"{source}-{name}.safetensors"
        if trained.is_file():
            models[name] = trained
        else:
            print(f"{trained}: missing (benchmarks/train_zoo.py --only {source}-{name}); row left out",
                  file=sys.stderr)
    work = args.work / source
    work.mkdir(parents=True, exist_ok=True)
    for name, (attack, options) in model_attacks().items():
        if args.rows and name not in args.rows:
            continue
        out = work / f"{name}.safetensors"
        if not (out.is_file() and trigger_path_for(out).is_file()):
            start = time.perf_counter()
            try:
                attack_model(attack, clean, data, out, options=options)
            except Exception as e:  # an attack that cannot run here is a row with its error
                print(f"{source} {name}: attack failed: {e}", file=sys.stderr)
                continue
            print(f"{source} {name}: attacked in {time.perf_counter() - start:.0f} s", flush=True)
        models[name] = out
    if args.rows:
        models = {k: v for k, v in models.items() if k in args.rows}
    return models


def defence_row(source: str, model: Path, work: Path, bench: Any) -> dict[str, Any]:
    """Every defence on one attacked model (see the module notes)."""
    data = load_dataset(source)
    trigger = Trigger.load(trigger_path_for(model))
    target = trigger.target
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - start
        return out

    scan_dir = work / f"{model.stem}-scan"
    result = timed("scan", lambda: scan(model, data, decision="verdict", ground_truth=trigger,
                                        out_dir=scan_dir, progress=False))
    paper, verdict = result.extra.get("paper", {}), result.extra.get("verdict", {})
    truth = result.extra.get("ground_truth", {})  # its target_flagged is the verdict's
    flagged = paper.get("flagged_labels", result.flagged_labels)
    filt = timed("filter", lambda: build_filter(model, scan_dir, data, labels=[target], publish=False)[1]
                 .to_dict())
    prune = timed("prune", lambda: repair(model, scan_dir, data, method="prune", labels=[target],
                                          max_accuracy_drop=None, progress=False, publish=False).to_dict())
    unlearn = timed("unlearn", lambda: repair(model, scan_dir, data, method="unlearn", labels=[target],
                                              progress=False, publish=False).to_dict())
    strip = timed("strip", lambda: strip_evaluate(model, data, trigger, frr=0.01, samples=1000,
                                                  calibration_samples=1000, progress=False).to_dict())
    module = load_model(model, input_shape=data.input_shape).module
    others = timed("fine_pruning_and_autoencoder", lambda: bench.defences(module, trigger, data))
    return {
        "target": target, "trigger_area": trigger.area,
        "before": unlearn["before"],
        "neural_cleanse": {"flagged": flagged, "target_flagged": target in flagged,
                           "anomaly_index": paper.get("anomaly_index", result.anomaly_index),
                           "target_anomaly_index": truth.get("target_anomaly_index")},
        "verdict": {"verdict": verdict.get("verdict"), "targets": verdict.get("targets"),
                    "score": verdict.get("score"), "right_target": target in (verdict.get("targets") or [])},
        "iou": truth.get("overlap"),
        "filter": {k: filt["filter"].get(k) for k in ("fpr", "fnr_reversed", "fnr_real")},
        "prune": {"fraction": prune["pruning"]["fraction"], **{k: prune["after"][k]
                                                               for k in ("clean_accuracy", "real_asr")}},
        "unlearn": {k: unlearn["after"][k] for k in ("clean_accuracy", "real_asr")},
        "strip": {"far": strip["far"], "frr": strip["frr"]},
        **others,
        "seconds": timings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist", help="comma-separated: mnist, gtsrb")
    ap.add_argument("--rows", nargs="*", default=None,
                    help="only these rows (badnets, trojannn-square-real …)")
    ap.add_argument("--models-dir", type=Path, default=Path("bench_out/models"))
    ap.add_argument("--clean-dir", type=Path, default=Path("bench_out/trojannn"))
    ap.add_argument("--work", type=Path, default=Path("bench_out/defence_table"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/defence_table.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bench = _trojannn_bench()
    results = json.loads(args.out.read_text())["rows"] if args.out.exists() else {}
    for source in args.data.split(","):
        for name, model in attacked_models(source, args, bench).items():
            key = f"{source}/{name}"
            try:
                results[key] = defence_row(source, model, args.work / source, bench)
            except Exception as e:  # one row's failure is recorded, the table goes on
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            shown = ("neural_cleanse", "verdict", "iou", "filter", "prune", "unlearn", "strip", "error")
            print(json.dumps({key: {k: results[key].get(k) for k in shown}}), flush=True)
            write_json(args.out, {"benchmark": "defence-table", "environment": environment(),
                                  "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
