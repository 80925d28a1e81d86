"""One home for input checks: every entry point refuses bad images, labels, fractions, choices and
models with the same one-line messages (a :class:`TrojanscanError` naming the argument and the fix)."""

from __future__ import annotations

import math
from collections.abc import Iterable
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
