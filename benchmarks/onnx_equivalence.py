"""Does a model scan the same after a trip through ONNX? Each reference net, and one model that expects
normalised inputs (scanned with --mean/--std), is trained briefly with a BadNets patch, exported with
torch's exporter, read back by trojanscan's converter, and scanned both ways with one seed.

    python benchmarks/onnx_equivalence.py --out benchmarks/results/onnx_equivalence.json
    python benchmarks/onnx_equivalence.py --archs mnist-cnn --epochs 3 --steps 20   # a quick check

Written: per model, the flagged labels and anomaly index of both scans, the largest relative
difference of the per-label trigger L1 norms (and of the flagged labels' own), the largest logit
difference on the test split, and whether onnxruntime confirmed the conversion. Where torch's
exporter merged batch norm into the convolutions (same maths, other rounding: ~1e-6 in the logits,
which a 60-step trigger search can grow to percents for unflagged labels) the net is also exported
with ``do_constant_folding=False`` and compared again.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from trojanscan.api import load_dataset, load_model, scan, train_classifier
from trojanscan.attacks import BadNets
from trojanscan.fileio import write_json
from trojanscan.models import ARCHITECTURES
from trojanscan.models.wrappers import ExpectsNormalised
from trojanscan.workflows.records import environment

MEAN, STD = [0.45], [0.22]  # the normalised-input model's convention


def export(model: torch.nn.Module, shape: tuple[int, ...], path: Path, fold: bool = True) -> None:
    """torch's TorchScript-based exporter (the dynamo one needs onnxscript); ``fold`` False keeps
    batch norm apart from the convolution before it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated upstream
        torch.onnx.export(model.eval(), (torch.rand(1, *shape),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"], do_constant_folding=fold,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})


def folds_batch_norm(model: torch.nn.Module, path: Path) -> bool:
    """Whether the export merged batch-norm layers into convolutions (same maths, other rounding)."""
    import onnx

    graph = onnx.load(str(path)).graph
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return sum(n.op_type == "BatchNormalization" for n in graph.node) < norms


def compare(name: str, model: torch.nn.Module, data, work: Path, scan_options: dict,
            fold: bool = True) -> dict:
    convention = scan_options.pop("convention", {})
    path = work / f"{name}.onnx"
    export(model, data.input_shape, path, fold)
    loaded = load_model(path, input_shape=data.input_shape)
    with torch.no_grad():
        logit_diff = float((loaded(data.x_test) - model.eval()(data.x_test)).abs().max())
    runs = {}
    for kind, target in (("original", model), ("onnx", path)):
        start = time.perf_counter()
        result = scan(target, data, progress=False, **convention, **scan_options)
        runs[kind] = {"flagged_labels": result.flagged_labels, "anomaly_index": result.anomaly_index,
                      "l1_norms": [r.l1_norm for r in result.labels],
                      "seconds": round(time.perf_counter() - start, 2)}
    a, b = runs["original"]["l1_norms"], runs["onnx"]["l1_norms"]
    rel = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a, b, strict=True))
    same = runs["original"]["flagged_labels"] == runs["onnx"]["flagged_labels"]
    flagged = runs["original"]["flagged_labels"]
    row = {"model": name, "export": "default" if fold else "do_constant_folding=False",
           "batch_norm_folded": folds_batch_norm(model, path), "same_flagged": same,
           "flagged_l1_relative_difference": max((abs(a[i] - b[i]) / a[i] for i in flagged), default=None),
           "max_relative_l1_difference": rel, "max_logit_difference": logit_diff,
           "runtime_check": loaded.inspection["onnx"]["runtime_check"], **runs}
    print(f"{name}: flagged {runs['original']['flagged_labels']} / {runs['onnx']['flagged_labels']}, "
          f"L1 rel diff {rel:.2e}, logits {logit_diff:.2e}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--archs", default=",".join(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--clean-samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_equivalence.json"))
    args = p.parse_args()
    data = load_dataset(args.data)
    options = {"clean_samples": args.clean_samples, "steps": args.steps, "seed": args.seed}
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for i, arch in enumerate(a.strip() for a in args.archs.split(",") if a.strip()):
            trained = train_classifier(data, arch, epochs=args.epochs, batch_size=64, seed=args.seed + i,
                                       attack=BadNets(target=0, poison_rate=0.1, size=3, seed=0),
                                       progress=False)
            rows.append(compare(arch, trained.model, data, Path(work), dict(options)))
            if rows[-1]["batch_norm_folded"]:  # the same graph without the merge: the same arithmetic
                rows.append(compare(f"{arch}-unfolded", trained.model, data, Path(work), dict(options),
                                    fold=False))
            if i == 0:  # the same net, made to take (x - mean) / std as models from elsewhere often do
                normalised = ExpectsNormalised(trained.model, MEAN, STD)
                rows.append(compare(f"{arch}-normalised-input", normalised, data, Path(work),
                                    {**options, "convention": {"mean": MEAN, "std": STD}}))
    write_json(args.out, {"models": rows, "all_same_flagged": all(r["same_flagged"] for r in rows),
                          "max_relative_l1_difference": max(r["max_relative_l1_difference"] for r in rows),
                          "parameters": vars(args) | {"out": str(args.out)},
                          "seconds": round(time.perf_counter() - start, 1), "environment": environment()})
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
