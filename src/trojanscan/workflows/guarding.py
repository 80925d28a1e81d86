"""Guarding a deployed model input by input: calibrating STRIP or the combined guard (STRIP + TeCo …),
checking inputs with them or with the input filter, and measuring a guard's FRR, FAR and speed."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trojanscan.data import Dataset
from trojanscan.data.images import RunInputs
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.base import InputGuard
from trojanscan.defenses.consistency import upper_threshold
from trojanscan.defenses.guard import Guard, GuardOptions
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.strip import MIN_CALIBRATION_SAMPLES, Strip
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import locks_out_dir
from trojanscan.metrics import far_frr, roc_auc
from trojanscan.options import describe_options, option_fields
from trojanscan.progress import ProgressCallback, Stages
from trojanscan.report import write_guard_report, write_strip_report
from trojanscan.report.progress import progress_bars
from trojanscan.train import predict
from trojanscan.validation import check_choice
from trojanscan.workflows.inputs import (
    DataLike,
    InputsLike,
    ModelLike,
    as_run_inputs,
    held_out,
    held_out_generator,
    known_trigger,
    model_and_inputs,
    resolve,
)
from trojanscan.workflows.records import Record, environment, internal


def strip_calibrate(model: ModelLike, data: DataLike, *, n: int = 100, frr: float = 0.01,
                    samples: int = 2000, blend: str = "add", boundary: str = "normal", seed: int = 0,
                    arch: str | None = None, temperature: float | str = 1.0,
                    out: str | os.PathLike | None = None, accelerate: bool = True,
                    mean: list[float] | None = None, std: list[float] | None = None,
                    trusted: bool = False, progress: bool | ProgressCallback = True,
                    device: str = "cpu") -> Strip:
    """Fit STRIP's boundary on ``samples`` benign training images (also the overlay pool)."""
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    strip = Strip(resolved.module, n=n, frr=frr, blend=blend, boundary=boundary, seed=seed,
                  temperature=temperature, accelerate=accelerate)
    return _calibrated(strip, resolved.dataset, samples, seed, out, "strip calibrate",
                       f"{samples} images × {n} copies", progress)


def _calibrated(guard: InputGuard, dataset: Dataset, samples: int, seed: int,
                out: str | os.PathLike | None, task: str, info: str,
                progress: bool | ProgressCallback) -> Any:
    """``guard`` fitted on ``samples`` held-out benign training images, and saved to ``out`` if given."""
    with progress_bars(progress is True) as bars, Stages(bars or progress, task, 1) as stage:
        stage(info)
        guard.fit(held_out(dataset, "calibration", samples, seed)[0])
    if out is not None:
        guard.save(out)
    return guard


def _guard(module: torch.nn.Module, options: dict[str, Any]) -> Guard:
    """The combined guard with ``options`` (its keywords); an unknown one is a one-line error."""
    unknown = sorted(set(options) - set(option_fields(GuardOptions)))
    if unknown:
        raise TrojanscanError(f"the guard has no option {', '.join(unknown)}; its options are: "
                              f"{', '.join(describe_options(GuardOptions))}")
    return Guard(module, **options)


def guard_calibrate(model: ModelLike, data: DataLike, *, samples: int = 2000, arch: str | None = None,
                    out: str | os.PathLike | None = None, mean: list[float] | None = None,
                    std: list[float] | None = None, trusted: bool = False,
                    progress: bool | ProgressCallback = True, device: str = "cpu", **options: Any) -> Guard:
    """Calibrate the combined guard on ``samples`` benign training images for its overall FRR.

    ``options`` are :class:`~trojanscan.defenses.guard.Guard`'s keywords (``detectors``, ``frr``,
    ``n``, ``temperature``, ``severity`` …). Example::

        guard = guard_calibrate("model.safetensors", "gtsrb", frr=0.01, out="guard.npz")
    """
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    guard = _guard(resolved.module, options)
    return _calibrated(guard, resolved.dataset, samples, guard.seed, out, "guard calibrate",
                       f"{samples} images through {' + '.join(guard.detectors)}", progress)


@dataclass
class CheckRecord(Record):
    """A guard's verdict on each input of a batch."""

    command: str
    inputs: str
    count: int
    flagged: int
    seconds: float
    settings: dict[str, Any]
    results: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:  # the flat layout of earlier releases
        d = super().to_dict()
        return {k: v for k, v in d.items() if k != "settings"} | d["settings"]

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def strip_check(model: ModelLike, calibration: str | os.PathLike, inputs: InputsLike, *,
                arch: str | None = None, full_entropy: bool = False, accelerate: bool = True,
                mean: list[float] | None = None, std: list[float] | None = None,
                trusted: bool = False, device: str = "cpu") -> CheckRecord:
    """Predict and flag each input with a saved calibration.

    By default each input is copied only until its verdict is certain (:meth:`Strip.screen`), so
    an input decided early gets ``entropy_at_least`` (benign) or ``entropy_below`` (trojaned) instead
    of ``entropy``; ``full_entropy`` runs all N copies for every input.
    """
    inputs = as_run_inputs(inputs)
    module, x = model_and_inputs(model, inputs, arch, mean, std, trusted, device)
    strip = Strip.load(calibration, module, accelerate=accelerate)
    start = time.perf_counter()
    if full_entropy:
        entropy = strip.entropy(x)
        flags, total, used = entropy < strip.boundary_, entropy * strip.n, torch.full((len(x),), strip.n)
    else:
        flags, total, used = strip.screen(x)
    labels = strip.labels(x)
    seconds = time.perf_counter() - start
    results = []
    for i, (lab, f, h_sum, k) in enumerate(zip(labels, flags, total, used, strict=True)):
        row: dict[str, Any] = {"index": i, "label": int(lab), "trojaned": bool(f), "copies": int(k)}
        if k == strip.n:
            row["entropy"] = float(h_sum) / strip.n
        elif f:  # stopped early: too low to reach the boundary even with maximal remaining copies
            row["entropy_below"] = strip.boundary_
        else:  # stopped early: the copies so far already pass the boundary
            row["entropy_at_least"] = float(h_sum) / strip.n
        results.append(row)
    return CheckRecord(
        command="strip check", inputs=inputs.source, count=len(x), flagged=int(flags.sum()),
        seconds=seconds, results=_with_files(results, inputs),
        settings={"trojaned": int(flags.sum()), "boundary": strip.boundary_, "n": strip.n,
                  "temperature": strip.temperature_, "accelerated": strip.accelerated,
                  "mean_copies": float(used.double().mean()) if len(x) else 0.0,
                  "inputs_per_second": len(x) / seconds if seconds else None, "model_trusted": trusted,
                  "inputs_read_as": inputs.how})


def guard_check(model: ModelLike, calibration: str | os.PathLike, inputs: InputsLike, *,
                arch: str | None = None, accelerate: bool = True, mean: list[float] | None = None,
                std: list[float] | None = None, trusted: bool = False, device: str = "cpu") -> CheckRecord:
    """Predict and flag each input with a saved guard; each row names the detector that flagged it
    (pooled rule: the one with the strongest evidence; OR rule: members screen in order, so only the
    first one that flags an input is named)."""
    inputs = as_run_inputs(inputs)
    module, x = model_and_inputs(model, inputs, arch, mean, std, trusted, device)
    guard = Guard.load(calibration, module, accelerate=accelerate)
    start = time.perf_counter()
    flags, by = guard.screen(x)
    labels = guard.labels(x)
    seconds = time.perf_counter() - start
    names = list(guard.detectors)
    return CheckRecord(
        command="guard check", inputs=inputs.source, count=len(x), flagged=int(flags.sum()),
        seconds=seconds, settings={
            "trojaned": int(flags.sum()), "frr": guard.frr, "detectors": names,
            "thresholds": guard.thresholds_, "accelerated": guard.accelerated,
            "inputs_per_second": len(x) / seconds if seconds else None, "model_trusted": trusted,
            "inputs_read_as": inputs.how},
        results=_with_files([{"index": i, "label": int(lab), "trojaned": bool(f),
                              "flagged_by": names[b] if b >= 0 else None}
                             for i, (lab, f, b) in enumerate(zip(labels, flags, by, strict=True))], inputs))


def filter_check(model: ModelLike, filter_path: str | os.PathLike, inputs: InputsLike, *,
                 arch: str | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None, trusted: bool = False, device: str = "cpu") -> CheckRecord:
    """Predict each input with a saved input filter in front: label, score, rejected."""
    inputs = as_run_inputs(inputs)
    module, x = model_and_inputs(model, inputs, arch, mean, std, trusted, device)
    filt = InputFilter.load(filter_path, module)
    start = time.perf_counter()
    scores, labels = filt.score(x), predict(module, x)
    rejected = scores > filt.threshold_
    seconds = time.perf_counter() - start
    return CheckRecord(
        command="filter check", inputs=inputs.source, count=len(x), flagged=int(rejected.sum()),
        seconds=seconds, settings={"rejected": int(rejected.sum()), "threshold": filt.threshold_,
                                   "model_trusted": trusted, "inputs_read_as": inputs.how},
        results=_with_files([{"index": i, "label": int(lab), "score": float(sc), "rejected": bool(r)}
                             for i, (lab, sc, r) in enumerate(zip(labels, scores, rejected, strict=True))],
                            inputs))


def _with_files(rows: list[dict[str, Any]], inputs: RunInputs) -> list[dict[str, Any]]:
    """Each result row with its image file's name, when the inputs were image files."""
    if inputs.files:
        for row in rows:
            row["file"] = inputs.files[row["index"]]
    return rows


def _per_second(work: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    work()
    return count / max(time.perf_counter() - start, 1e-9)


def _throughput(strip: Strip, x: torch.Tensor,
                stamped: torch.Tensor | None = None) -> dict[str, float]:
    """Inputs per second: plain inference (by the module STRIP classifies with), all N copies
    (``entropy``), and guarded prediction (labels + early-exit flags, :meth:`Strip.predict`) on
    benign and, if given, stamped inputs."""
    plain = _per_second(lambda: strip.labels(x), len(x))
    full = _per_second(lambda: strip.entropy(x), len(x))
    record = {"inputs_per_second": full, "plain_inputs_per_second": plain, "slowdown": plain / full,
              "guarded_benign_inputs_per_second": _per_second(lambda: strip.predict(x), len(x))}
    if stamped is not None:
        record["guarded_trojaned_inputs_per_second"] = _per_second(lambda: strip.predict(stamped),
                                                                  len(stamped))
    return record


@dataclass
class StripRun:
    """What :func:`strip_rates` measured: the inputs, their entropies and the error rates."""

    benign: torch.Tensor
    h_benign: torch.Tensor
    stamped: torch.Tensor | None
    h_trojan: torch.Tensor | None
    rates: dict[str, Any]


def evaluation_inputs(dataset: Dataset, trigger: Trigger | None, samples: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``samples`` clean test images and (with a trigger) as many stamped test images of labels
    other than its targets: the held-out draws every guard's FRR and FAR are measured on. A
    multi-target trigger's parts stamp the images in turn, one part each (see
    :meth:`Trigger.apply_in_turn`); :func:`stamped_labels` gives the stamped images' true labels."""
    g = held_out_generator("evaluation", seed)
    benign = dataset.x_test[torch.randperm(len(dataset.x_test), generator=g)[:samples]]
    if trigger is None:
        return benign, None
    others = dataset.x_test[_not_targets(dataset, trigger)]
    return benign, trigger.apply_in_turn(others[torch.randperm(len(others), generator=g)[:samples]])


def _not_targets(dataset: Dataset, trigger: Trigger) -> torch.Tensor:
    return ~torch.isin(dataset.y_test, torch.tensor(trigger.targets))


def stamped_labels(dataset: Dataset, trigger: Trigger, samples: int, seed: int) -> torch.Tensor:
    """The true labels of the stamped images :func:`evaluation_inputs` draws (same seed and size)."""
    g = held_out_generator("evaluation", seed)
    torch.randperm(len(dataset.x_test), generator=g)  # the benign draw comes first
    others = dataset.y_test[_not_targets(dataset, trigger)]
    return others[torch.randperm(len(others), generator=g)[:samples]]


CALIBRATION_SPLITS = ("train", "test")


def calibration_images(dataset: Dataset, split: str, n: int, samples: int, seed: int) -> torch.Tensor:
    """``n`` benign calibration images: held-out training images (``"train"``, as STRIP's), or test
    images that :func:`evaluation_inputs` with ``samples`` does not use (``"test"``: the next ones in
    its draw order). A model is more confident on images it was trained on, so ``"test"`` is the
    fairer stand-in for a user's own clean data."""
    check_choice("calibration split", split, CALIBRATION_SPLITS)
    if split == "train":
        return held_out(dataset, "calibration", n, seed)[0]
    order = torch.randperm(len(dataset.x_test), generator=held_out_generator("evaluation", seed))
    if samples + n > len(order):
        raise TrojanscanError(f"{dataset.name}: {len(order)} test images are too few for {samples} "
                              f"evaluation and {n} calibration images; calibrate on the training split "
                              "or use fewer")
    return dataset.x_test[order[samples:samples + n]]


def strip_rates(strip: Strip, dataset: Dataset, trigger: Trigger | None, *, samples: int = 2000,
                calibration_samples: int = 2000, seed: int = 0) -> StripRun:
    """Calibrate ``strip`` on training images, then measure FRR on ``samples`` clean test images
    and (with a trigger) FAR on as many stamped ones of other labels."""
    strip.calibrate(held_out(dataset, "calibration", calibration_samples, seed)[0])
    benign, stamped = evaluation_inputs(dataset, trigger, samples, seed)
    h_benign = strip.entropy(benign)
    if stamped is None:  # a clean model: only the false rejections can be measured
        return StripRun(benign, h_benign, None, None,
                        far_frr(h_benign < strip.boundary_, torch.zeros(0)))
    h_trojan = strip.entropy(stamped)
    return StripRun(benign, h_benign, stamped, h_trojan,
                    far_frr(h_benign < strip.boundary_, h_trojan < strip.boundary_))


@dataclass
class StripEvaluation(Record):
    """STRIP's FRR and FAR on one model, with its throughput for N = 10, 20 and 100."""

    frr: float
    far: float
    target_frr: float
    n: int
    blend: str
    boundary_method: str
    boundary: float
    temperature: float | str
    temperature_used: float
    accelerated: bool
    benign_entropy: dict[str, float]
    trojaned_entropy: dict[str, float]
    calibration: dict[str, Any]
    benign_inputs: int
    trojaned_inputs: int
    throughput: dict[str, dict[str, float]]
    trigger: dict[str, Any]
    seed: int
    model_sha256: str | None
    model_trust: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, str]
    summary: dict[str, str]
    command: str = "strip evaluate"
    guard: Strip | None = internal()  # the calibrated detector, ready for predict()


@locks_out_dir()
def strip_evaluate(model: ModelLike, data: DataLike, trigger: Trigger | str | os.PathLike | None = None, *,
                   n: int = 100, frr: float = 0.01, samples: int = 2000, calibration_samples: int = 2000,
                   blend: str = "add", boundary: str = "normal", seed: int = 0,
                   arch: str | None = None, throughput_inputs: int = 500,
                   temperature: float | str = 1.0, out_dir: str | os.PathLike | None = None,
                   accelerate: bool = True, mean: list[float] | None = None,
                   std: list[float] | None = None, trusted: bool = False,
                   progress: bool | ProgressCallback = True, device: str = "cpu") -> StripEvaluation:
    """FRR on clean test images and FAR on trigger-stamped ones, with throughput for N=10, 20, 100."""
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    module, dataset = resolved.module, resolved.dataset
    trig = known_trigger(trigger, resolved)
    if trig is None:
        raise TrojanscanError("strip evaluate needs the trigger (--trigger FILE) to stamp inputs")
    if throughput_inputs < MIN_CALIBRATION_SAMPLES:
        raise TrojanscanError(f"throughput_inputs must be at least {MIN_CALIBRATION_SAMPLES} (each N is "
                              f"calibrated on that many images), got {throughput_inputs}")
    strip = Strip(module, n=n, frr=frr, blend=blend, boundary=boundary, seed=seed,
                  temperature=temperature, accelerate=accelerate)
    with progress_bars(progress is True) as bars, Stages(bars or progress, "strip evaluate", 4) as stage:
        stage(f"FRR and FAR: {calibration_samples} calibration + 2 × {samples} test images, N={n}")
        run = strip_rates(strip, dataset, trig, samples=samples, calibration_samples=calibration_samples,
                          seed=seed)
        benign, h_benign, h_trojan, rates = run.benign, run.h_benign, run.h_trojan, run.rates
        assert h_trojan is not None and run.stamped is not None  # a trigger was given
        speed = {}
        calibration = strip.overlays_  # strip_rates calibrated on these images, also the overlay pool
        for copies in (10, 20, 100):  # each N gets its own boundary, which sets where screening stops
            stage(f"throughput at N={copies}")
            probe = Strip(module, n=copies, frr=frr, blend=blend, boundary=boundary, seed=seed,
                          temperature=strip.temperature_, accelerate=accelerate)
            with warnings.catch_warnings():  # recorded below instead
                warnings.simplefilter("ignore", UserWarning)
                probe.calibrate(calibration[:throughput_inputs], overlay_pool=strip.overlays_)
            speed[f"n{copies}"] = _throughput(probe, benign[:throughput_inputs],
                                              run.stamped[:throughput_inputs])
            speed[f"n{copies}"]["boundary"] = probe.boundary_  # at or below 0 nothing can be flagged
    record = StripEvaluation(
        frr=rates["frr"], far=rates["far"], target_frr=frr, n=n, blend=blend, boundary_method=boundary,
        boundary=strip.boundary_, temperature=strip.temperature, temperature_used=strip.temperature_,
        accelerated=strip.accelerated,
        benign_entropy={"mean": float(h_benign.mean()), "std": float(h_benign.std())},
        trojaned_entropy={"mean": float(h_trojan.mean()), "std": float(h_trojan.std())},
        calibration={"samples": strip.n_calibration_, "mean": strip.entropy_mean_,
                     "std": strip.entropy_std_, "sha256": strip.calibration_sha256_},
        benign_inputs=len(benign), trojaned_inputs=len(h_trojan), throughput=speed,
        trigger={"target": trig.target, "kind": trig.kind}, seed=seed, model_sha256=resolved.sha256,
        model_trust=resolved.trust_record(), guard=strip,
        data={"name": dataset.name, "sha256": dataset.sha256}, environment=environment(),
        summary={
            "FRR (benign flagged)": f"{100 * rates['frr']:.2f}%",
            "FAR (trojaned accepted)": f"{100 * rates['far']:.2f}%",
            "boundary (bits)": f"{strip.boundary_:.4f}",
            "inputs/s, N=10": f"{speed['n10']['inputs_per_second']:.0f}",
            "inputs/s, N=100": f"{speed['n100']['inputs_per_second']:.0f}",
            "guarded benign inputs/s, N=20 (early exit)":
                f"{speed['n20']['guarded_benign_inputs_per_second']:.0f}",
            "softmax temperature": f"{strip.temperature_:g}",
            "plain inference inputs/s": f"{speed['n10']['plain_inputs_per_second']:.0f}",
        })
    if out_dir is not None:
        out = Path(out_dir)
        record.write(out / "strip.json")
        write_strip_report(record.to_dict(), h_benign, h_trojan, out / "report.html")
    return record


def _guard_throughput(guard: Guard, benign: torch.Tensor, stamped: torch.Tensor) -> dict[str, Any]:
    """Inputs per second: plain inference (by the module the guard classifies with), guarded
    prediction (labels + early-exit flags) of benign and of stamped inputs, and each detector alone
    on benign inputs; ``cost_*`` are the slowdowns against plain inference."""
    guard.predict(benign[:8])  # builds the frozen copies outside the timings
    plain = _per_second(lambda: guard.labels(benign), len(benign))
    guarded = {"benign": _per_second(lambda: guard.predict(benign), len(benign)),
               "trojaned": _per_second(lambda: guard.predict(stamped), len(stamped))}
    members = {name: _per_second(lambda m=m: m.detect(benign), len(benign))
               for name, m in guard.members.items()}
    return {"inputs": len(benign), "plain_inputs_per_second": plain,
            **{f"guarded_{k}_inputs_per_second": v for k, v in guarded.items()},
            **{f"cost_{k}": plain / v for k, v in guarded.items()},
            "detectors": {name: {"benign_inputs_per_second": v, "cost_benign": plain / v}
                          for name, v in members.items()}}


def _spread(scores: torch.Tensor) -> dict[str, float]:
    return {"mean": float(scores.mean()), "std": float(scores.std())}


@dataclass
class GuardEvaluation(Record):
    """The combined guard's FAR and FRR on one model, each detector's alone and inside the guard,
    and the throughput against plain inference."""

    far: float
    frr: float
    target_frr: float
    detector_order: list[str]
    thresholds: dict[str, float]
    detectors: dict[str, dict[str, Any]]
    benign_inputs: int
    trojaned_inputs: int
    throughput: dict[str, Any]
    options: dict[str, Any]
    calibration: dict[str, Any]
    trigger: dict[str, Any]
    seed: int
    model_sha256: str | None
    model_trust: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, str]
    summary: dict[str, str]
    command: str = "guard evaluate"
    rule: str = "or"  # how the detectors' evidence makes the decision (Guard's rule)
    pooled: dict[str, Any] | None = None  # the pooled rule's threshold and statistics, when it decides
    guard: Guard | None = internal()  # the calibrated guard, ready for predict()
    benign_scores: dict[str, torch.Tensor] | None = internal()
    trojaned_scores: dict[str, torch.Tensor] | None = internal()


@locks_out_dir()
def guard_evaluate(model: ModelLike, data: DataLike, trigger: Trigger | str | os.PathLike | None = None, *,
                   samples: int = 2000, calibration_samples: int = 2000, calibration_split: str = "train",
                   throughput_inputs: int = 500, arch: str | None = None,
                   out_dir: str | os.PathLike | None = None, mean: list[float] | None = None,
                   std: list[float] | None = None, trusted: bool = False,
                   progress: bool | ProgressCallback = True, device: str = "cpu",
                   **options: Any) -> GuardEvaluation:
    """Calibrate the combined guard on benign training images, then measure its FRR on ``samples``
    clean test images and its FAR on as many stamped ones, with every detector's own figures (alone
    at the same FRR, and inside the guard) and the throughput on ``throughput_inputs`` of each.
    ``calibration_split``: where the benign calibration images come from (see
    :func:`calibration_images`).

    ``options`` are :class:`~trojanscan.defenses.guard.Guard`'s keywords. Writes ``guard.json`` and
    ``report.html`` to ``out_dir`` if given.
    """
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    dataset = resolved.dataset
    trig = known_trigger(trigger, resolved)
    if trig is None:
        raise TrojanscanError("guard evaluate needs the trigger (--trigger FILE) to stamp inputs")
    if throughput_inputs < 8:
        raise TrojanscanError(f"throughput_inputs must be at least 8, got {throughput_inputs}")
    guard = _guard(resolved.module, options)
    calibration = calibration_images(dataset, calibration_split, calibration_samples, samples, guard.seed)
    with progress_bars(progress is True) as bars, Stages(bars or progress, "guard evaluate", 3) as stage:
        stage(f"calibrating {' + '.join(guard.detectors)} on {calibration_samples} images")
        guard.fit(calibration)
        stage(f"FRR and FAR on 2 × {samples} test images")
        benign, stamped = evaluation_inputs(dataset, trig, samples, guard.seed)
        assert stamped is not None  # a trigger was given
        s_benign, s_trojan = guard.scores(benign), guard.scores(stamped)
        rates = far_frr(guard.decide(s_benign), guard.decide(s_trojan))
        shown_benign, shown_trojan = dict(s_benign), dict(s_trojan)
        pooled = None
        if guard.rule == "pooled":
            shown_benign["pooled"], shown_trojan["pooled"] = guard.pooled(s_benign), guard.pooled(s_trojan)
            pooled = {"threshold": guard.pooled_threshold_,
                      "auroc": roc_auc(torch.cat([shown_benign["pooled"], shown_trojan["pooled"]]).tolist(),
                                       [False] * len(benign) + [True] * len(stamped)),
                      "benign_score": _spread(shown_benign["pooled"]),
                      "trojaned_score": _spread(shown_trojan["pooled"])}
        stage(f"throughput on 2 × {min(throughput_inputs, len(benign))} inputs")
        speed = _guard_throughput(guard, benign[:throughput_inputs], stamped[:throughput_inputs])
    detail = {}
    for name in guard.detectors:
        b, t = s_benign[name], s_trojan[name]
        alone = upper_threshold(guard.calibration_scores_[name], guard.frr)
        detail[name] = {
            "alone": {"threshold": alone, **far_frr(b > alone, t > alone)},
            "in_guard": {"threshold": guard.thresholds_[name], **far_frr(b > guard.thresholds_[name],
                                                                        t > guard.thresholds_[name])},
            "auroc": roc_auc(torch.cat([b, t]).tolist(), [False] * len(b) + [True] * len(t)),
            "benign_score": _spread(b), "trojaned_score": _spread(t)}
    record = GuardEvaluation(
        far=rates["far"], frr=rates["frr"], target_frr=guard.frr, detector_order=list(guard.detectors),
        thresholds=guard.thresholds_, detectors=detail, benign_inputs=len(benign),
        trojaned_inputs=len(stamped), throughput=speed, options=vars(guard.options()),
        calibration={"samples": guard.n_calibration_, "split": calibration_split,
                     "tail_per_detector": guard.tail_, "tail_allowed": guard.tail_allowed_},
        trigger={"target": trig.target, "kind": trig.kind}, seed=guard.seed, model_sha256=resolved.sha256,
        model_trust=resolved.trust_record(), data={"name": dataset.name, "sha256": dataset.sha256},
        environment=environment(), rule=guard.rule, pooled=pooled, guard=guard, benign_scores=s_benign,
        trojaned_scores=s_trojan,
        summary={
            "FRR (benign flagged)": f"{100 * rates['frr']:.2f}%",
            "FAR (trojaned accepted)": f"{100 * rates['far']:.2f}%",
            **{f"{name} alone: FAR at FRR": f"{100 * d['alone']['far']:.2f}% at "
               f"{100 * d['alone']['frr']:.2f}%" for name, d in detail.items()},
            "plain inference inputs/s": f"{speed['plain_inputs_per_second']:.0f}",
            "guarded benign inputs/s": f"{speed['guarded_benign_inputs_per_second']:.0f}",
            "cost against plain inference (benign)": f"{speed['cost_benign']:.1f}×",
        })
    if out_dir is not None:
        out = Path(out_dir)
        record.write(out / "guard.json")
        write_guard_report(record.to_dict(), shown_benign, shown_trojan, out / "report.html")
    return record
