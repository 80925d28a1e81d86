"""STRIP throughput against the Adversarial Robustness Toolbox's STRIP, same model, inputs and N.

    pip install adversarial-robustness-toolbox   # only for this comparison
    python benchmarks/strip_vs_art.py --out bench_out/strip_vs_art.json

Both detectors are calibrated on the same 1,000 benign MNIST training images and then check the
same 1,000 clean and 1,000 trigger-stamped test images (labels plus a trojaned flag each). ART is
given the model with a softmax on top (its entropy needs probabilities). Without ART installed the
script measures trojanscan alone and says so. trojanscan runs three settings: the paper's (T = 1,
normal fit), T = 1 with the empirical quantile, and the automatic temperature with the normal fit,
all with the frozen copy of the model (``accelerate``), and T = 1 quantile once more without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trojanscan.api import held_out, resolve
from trojanscan.data.triggers import Trigger, trigger_path_for
from trojanscan.defenses.strip import Strip
from trojanscan.fileio import write_json


def _timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def _art(model: torch.nn.Module, shape: tuple[int, ...], classes: int, n: int, cal: torch.Tensor,
         inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    from art.defences.transformer.poisoning import STRIP
    from art.estimators.classification import PyTorchClassifier

    probs = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    clf = PyTorchClassifier(model=probs, loss=torch.nn.CrossEntropyLoss(), input_shape=shape,
                            nb_classes=classes, clip_values=(0.0, 1.0))
    defended = STRIP(clf)(num_samples=n)
    np.random.seed(0)  # ART draws its overlays from numpy's global generator
    record = {"calibrate_seconds": _timed(lambda: defended.mitigate(cal.numpy()))[0]}
    for name, x in inputs.items():
        seconds, out = _timed(lambda x=x: defended.predict(x.numpy()))
        abstained = np.all(out == 0, axis=1)  # ART abstains with an all-zero row
        record[f"{name}_seconds"] = seconds
        record[f"{name}_flagged"] = float(abstained.mean())
    return record


def _ours(model: torch.nn.Module, n: int, temperature: float | str, boundary: str, accelerate: bool,
          cal: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    seconds, strip = _timed(lambda: Strip(model, n=n, temperature=temperature, boundary=boundary,
                                          accelerate=accelerate).calibrate(cal))
    record = {"calibrate_seconds": seconds, "temperature_used": strip.temperature_,
              "boundary": strip.boundary_}
    for name, x in inputs.items():
        seconds, (_, flags) = _timed(lambda x=x: strip.predict(x))
        record[f"{name}_seconds"] = seconds
        record[f"{name}_flagged"] = float(flags.float().mean())
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("bench_out/models/mnist-badnets.safetensors"))
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("bench_out/strip_vs_art.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    resolved = resolve(args.model, args.data)
    model, data, path = resolved.module, resolved.dataset, resolved.path
    trigger = Trigger.load(trigger_path_for(path))
    cal = held_out(data, "calibration", args.inputs, 0)[0]
    clean = data.x_test[: args.inputs]
    stamped = trigger.apply(data.x_test[data.y_test != trigger.target][: args.inputs])
    inputs = {"clean": clean, "stamped": stamped}
    record: dict[str, object] = {"benchmark": "strip-vs-art", "model": str(args.model), "n": args.n,
                                 "inputs": args.inputs, "threads": torch.get_num_threads()}
    for temperature, boundary, accelerate in ((1.0, "normal", True), (1.0, "quantile", True),
                                              ("auto", "normal", True), (1.0, "quantile", False)):
        key = f"trojanscan_T={temperature}_{boundary}" + ("" if accelerate else "_eager")
        record[key] = _ours(model, args.n, temperature, boundary, accelerate, cal, inputs)
        print(json.dumps({key: record[key]}), flush=True)
    if importlib.util.find_spec("art") is None:
        record["art"] = "not installed (pip install adversarial-robustness-toolbox)"
    else:
        record["art"] = _art(model, tuple(data.input_shape), data.num_classes, args.n, cal, inputs)
        for key in [k for k in record if k.startswith("trojanscan_")]:
            ours = record[key]
            record[f"speedup_{key}"] = {name: record["art"][f"{name}_seconds"] / ours[f"{name}_seconds"]
                                        for name in inputs}
    print(json.dumps({k: v for k, v in record.items() if k.startswith(("art", "speedup"))}), flush=True)
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
