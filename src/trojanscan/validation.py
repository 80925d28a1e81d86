"""One home for input checks: every entry point refuses bad images, labels, fractions, numbers,
choices and models with the same one-line messages (a :class:`TrojanscanError` naming the argument and
the fix). :data:`OPTION_BOUNDS` holds the range of every numeric command-line option."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trojanscan.errors import TrojanscanError

MIN_CLEAN_SAMPLES = 20


def check_images(x: Any, name: str, shape: tuple[int, ...] | None = None) -> None:
    """Refuse images a defence cannot use: not a N×C×H×W float tensor, wrong size, NaN, outside [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TrojanscanError(f"{name} must be a torch tensor N×C×H×W, got {type(x).__name__}")
    if x.dim() != 4:
        raise TrojanscanError(f"{name} must be N×C×H×W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TrojanscanError(f"{name} must be float images in [0, 1], got {x.dtype}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise TrojanscanError(f"{name} are images {tuple(x.shape[1:])} but the overlays are {tuple(shape)}; "
                              "pass images of the size the detector was calibrated on")
    if x.numel() and not torch.isfinite(x).all():
        raise TrojanscanError(f"{name} contain NaN or infinity")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise TrojanscanError(f"{name} must be in [0, 1]; put normalisation inside the model")


def check_labels(y: torch.Tensor, num_classes: int, count: int | None = None, name: str = "labels") -> None:
    """Refuse labels of the wrong length or outside ``0..num_classes-1``."""
    if count is not None and len(y) != count:
        raise TrojanscanError(f"{count} images but {len(y)} {name}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise TrojanscanError(f"{name} must be in 0..{num_classes - 1}")


def check_fraction(name: str, value: Any, *, low_inclusive: bool = False,
                   high_inclusive: bool = False) -> float:
    """A finite fraction between 0 and 1 (bounds exclusive unless asked), returned as a float."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (0 <= value if low_inclusive else 0 < value)
          and (value <= 1 if high_inclusive else value < 1))
    if not ok:
        lo, hi = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        raise TrojanscanError(f"{name} must be a fraction in {lo}0, 1{hi}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any, integer: bool = True) -> None:
    """A positive finite number (an integer unless ``integer`` is False), else a one-line error."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value):
        raise TrojanscanError(f"{name} must be a positive {'integer' if integer else 'number'}, "
                              f"got {value!r}")


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: ``kind`` (int or float) between ``low`` and ``high`` (included
    unless ``low_open``/``high_open``); ``what`` says what it counts, for the message."""

    kind: type
    low: float
    high: float
    what: str = ""
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """``"a number in (0, 1]"`` or ``"a whole number from 1 to 1000"``."""
        if self.kind is int:
            return f"a whole number from {int(self.low)} to {int(self.high)}"
        if not math.isfinite(self.low) and not math.isfinite(self.high):
            return "a finite number"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.high_open else ']'}")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be >= 2"``), or ``None`` if it is within bounds."""
        kinds = (numbers.Integral,) if self.kind is int else (numbers.Real,)  # numpy's too
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return f"must be {self.describe()}"
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        if value < self.low or (self.low_open and value == self.low):
            return f"must be {'>' if self.low_open else '>='} {show(self.low)}"
        if value > self.high or (self.high_open and value == self.high):
            return f"must be {'<' if self.high_open else '<='} {show(self.high)}"
        return None


def check_number(name: str, value: Any, bounds: Bounds) -> int | float:
    """``value`` if it is a finite number of the right kind within ``bounds``; otherwise a one-line
    error naming ``name`` (``"--n must be <= 1000 (perturbed copies per input), got 10000"``). Ints
    are accepted where floats are asked (and returned as floats)."""
    problem = bounds.problem(value)
    if problem is not None:
        raise TrojanscanError(f"{name} {problem}{f' ({bounds.what})' if bounds.what else ''}, got {value!r}")
    return int(value) if bounds.kind is int else float(value)


INT64_MAX = 2**63 - 1
# every seed ends up in torch, numpy and int64 fields of our files: torch.manual_seed takes
# -2^63..2^64-1 (negatives wrap around), but np.int64 and C longs stop at 2^63-1
SEED = Bounds(int, 0, INT64_MAX, "a seed")
STRIP_COPIES = Bounds(int, 1, 1000, "perturbed copies per input; the paper uses 100")
SAMPLES = Bounds(int, 1, 10_000_000, "images")
OPEN_FRACTION = Bounds(float, 0, 1, low_open=True, high_open=True)
FRACTION_TO_ONE = Bounds(float, 0, 1, low_open=True)

OPTION_BOUNDS: dict[str, Bounds | None] = {
    # shared by several commands
    "--seed": SEED,
    "--epochs": Bounds(int, 1, 10_000, "training epochs"),
    "--batch-size": Bounds(int, 1, 65_536, "images per batch"),
    "--lr": Bounds(float, 0, 10, "learning rate", low_open=True),
    "--samples": SAMPLES,
    "--clean-samples": SAMPLES,
    "--steps": Bounds(int, 1, 1_000_000, "optimisation steps"),
    "--repeats": Bounds(int, 1, 1000, "seeds"),
    "--n": STRIP_COPIES,
    # train / attack
    "--target": Bounds(int, 0, 1_000_000, "a label"),
    "--trigger-size": Bounds(int, 1, 4096, "patch side in pixels"),
    "--alpha": Bounds(float, 0, 1, "blend opacity", low_open=True),
    "--pixels": Bounds(int, 1, 1 << 24, "trigger pixels"),
    "--poison-rate": Bounds(float, 0, 1, "share of the training images poisoned", True, True),
    "--wb": Bounds(int, 1, 1 << 31, "last-layer weights the attack may change"),
    # scan
    "--chunk": Bounds(int, 1, 100_000, "labels optimised together"),
    "--threshold": Bounds(float, 0, 100, "the anomaly index above which a label is flagged; the "
                          "paper uses 2", low_open=True),
    # filter / repair / STRIP
    "--fpr": OPEN_FRACTION,
    "--top": OPEN_FRACTION,
    "--frr": OPEN_FRACTION,
    "--asr-threshold": FRACTION_TO_ONE,
    "--step": FRACTION_TO_ONE,
    "--fraction": FRACTION_TO_ONE,
    "--stamp-fraction": Bounds(float, 0, 1),
    "--max-accuracy-drop": Bounds(float, 0, 100, "points of clean accuracy"),
    "--range": None,  # a choice of 1 or 255, refused with its own message by read_inputs
    # bench zoo
    "--size": Bounds(int, 2, 10_000, "models in the zoo"),
    "--train-samples": Bounds(int, 10, 10_000_000, "training images"),
    "--strip-n": Bounds(int, 2, STRIP_COPIES.high, STRIP_COPIES.what),
    "--strip-samples": Bounds(int, 10, SAMPLES.high, SAMPLES.what),
    # audit / bench zoo runners
    "--workers": Bounds(int, 1, 4096, "worker processes or Ray tasks at a time"),
    "--split-over": Bounds(int, 1, 1_000_000, "labels above which a model is split into label jobs"),
}
"""Every numeric command-line option → its bounds (``None``: checked by its own function). The
CLI refuses to start a command with a numeric option missing here."""

# method options (``--option KEY=VALUE``) that are the same quantity as the command-line option
SHARED_OPTION_FIELDS = ("seed", "epochs", "batch_size", "lr", "steps", "chunk", "threshold", "target",
                        "alpha", "pixels", "poison_rate", "wb", "fraction")


def check_option(flag: str, value: Any) -> Any:
    """A command-line option's value checked against :data:`OPTION_BOUNDS` (``None`` passes)."""
    bounds = OPTION_BOUNDS[flag]
    return value if value is None or bounds is None else check_number(flag, value, bounds)


def check_method_option(key: str, value: Any) -> Any:
    """A ``--option KEY=VALUE`` number, returned unchanged if it is within the bounds of the
    command-line option of the same name, or else at least finite and within 64 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    field = key.rpartition(".")[2]
    bounds = OPTION_BOUNDS.get("--" + field.replace("_", "-")) if field in SHARED_OPTION_FIELDS else None
    if bounds is None:
        bounds = (Bounds(int, -INT64_MAX, INT64_MAX) if isinstance(value, int)
                  else Bounds(float, -math.inf, math.inf))
    check_number(f"option {key}", value, bounds)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; otherwise an error listing them."""
    options = list(choices)
    if value not in options:
        raise TrojanscanError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
    return value


def check_model_fits(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                     source: str = "model") -> None:
    """Refuse a model that cannot take these images or whose outputs do not match the classes."""
    was_training = model.training
    model.eval()  # a probe must not touch batch-norm statistics
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:  # any shape error inside a foreign model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(
            f"{source}: cannot run on images of shape {tuple(input_shape)} ({first})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TrojanscanError(f"{source}: model returns {type(out).__name__}, not a tensor of class "
                              "scores; wrap it so that forward() returns logits")
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise TrojanscanError(
            f"{source}: model outputs {tuple(out.shape[1:])} scores per image but the data has "
            f"{num_classes} classes; use data with the model's classes")


def check_clean_data(x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> None:
    """Refuse clean data a scan cannot use: wrong shape, NaN, out of [0, 1], too few, bad labels."""
    if x.dim() != 4:
        raise TrojanscanError(f"clean images must be N×C×H×W, got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TrojanscanError(f"clean images must be float32 in [0, 1], got {x.dtype}")
    if len(x) < MIN_CLEAN_SAMPLES:
        raise TrojanscanError(f"a scan needs at least {MIN_CLEAN_SAMPLES} clean images, got "
                              f"{len(x)}; pass more with --clean-samples")
    if not torch.isfinite(x).all():
        raise TrojanscanError("clean images contain NaN or infinity")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise TrojanscanError("clean images must be in [0, 1]; put normalisation in the model "
                              "(--mean/--std)")
    if y is not None:
        if len(y) != len(x):
            raise TrojanscanError(f"{len(x)} clean images but {len(y)} labels")
        check_labels(y, num_classes, name="clean labels")
