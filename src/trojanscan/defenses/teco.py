"""TeCo (Liu et al., CVPR 2023): flag inputs whose robustness to image corruptions is inconsistent.

A benign image that survives one corruption tends to survive the others about as well; a stamped
image behaves very differently across them, because some corruptions destroy the trigger (a blur
wipes out a high-frequency patch or blend, and the label falls back to the true class) while others
leave it or even mimic it (noise keeps a noise-blend trigger's target). TeCo scores the *deviation*
of an input's robustness across corruption types.

The paper takes, per corruption type, the first of five severities at which the hard label changes,
and the standard deviation of those across the types. On our models that statistic fails where it
is needed most: noise itself triggers a noise-blend backdoor, so benign images flip at severity 1
under noise and never under blur, and look as inconsistent as stamped ones. We therefore measure
each corruption on the benign scale first. Every corruption is applied at one ``severity``; the
log-odds the model keeps for the input's label under it is turned into a normal score, Φ⁻¹ of
its mid-rank among the benign calibration inputs under the same corruption. The deviation is then
either the standard deviation of those normal scores across the corruptions (``deviation="std"``,
TeCo's statistic on the benign scale) or, by default, their Mahalanobis distance from the benign
ones (``"mahalanobis"``: the same idea with the benign covariance, so that corruptions whose
robustness goes together in benign images, such as the three noises, are not counted three times;
the covariance is shrunk by :data:`SHRINKAGE` towards a multiple of the identity). A benign input
is about as typical under every corruption (small deviation); a stamped one is unusually robust under
some and unusually fragile under others (large deviation). Calibration needs benign inputs only: the
threshold is the conformal upper quantile of the benign deviations, each benign input ranked against
the others.

The corruptions follow ImageNet-C's definitions and severity tables where they can be made in a few
tensor operations (``darken`` is ours), each a forward pass. The noise of each noise corruption is
one fixed field drawn from ``seed``, so an input's score does not depend on its batch or position.

Example::

    guard = TeCo(model).fit(clean_images)
    labels, trojaned = guard.predict(incoming_images)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.defenses.consistency import ConsistencyGuard
from trojanscan.errors import TrojanscanError
from trojanscan.validation import check_choice

SEVERITIES = 5
NOISE_FIELDS = 3  # Gaussian fields for gaussian and shot noise, a uniform one for impulse noise


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t.pow(2) / (2 * sigma**2))
    g = (g / g.sum()).repeat(x.shape[1], 1)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), g.view(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), g.view(c, 1, -1, 1), groups=c)


def _pixelate(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * factor)), max(1, int(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    mean = x.mean((-3, -2, -1), keepdim=True)
    return (x - mean) * c + mean


def _impulse(x: torch.Tensor, amount: float, field: torch.Tensor) -> torch.Tensor:
    salted = torch.where(field < amount, torch.ones_like(x), x)
    return torch.where(field < amount / 2, torch.zeros_like(x), salted)


# name → (severity table, corruption(x, level, noise fields)); x is a batch in [0, 1], the result is clipped
Corruption = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
CORRUPTIONS: dict[str, tuple[tuple[float, ...], Corruption]] = {
    "gaussian_noise": ((0.08, 0.12, 0.18, 0.26, 0.38), lambda x, s, f: x + s * f[0]),
    # Poisson noise of rate s·x, by its Gaussian approximation (so that the noise field is fixed)
    "shot_noise": ((60, 25, 12, 5, 3), lambda x, s, f: x + (x / s).sqrt() * f[1]),
    "impulse_noise": ((0.03, 0.06, 0.09, 0.17, 0.27), lambda x, s, f: _impulse(x, s, f[2])),
    "gaussian_blur": ((0.5, 0.75, 1.0, 1.5, 2.0), lambda x, s, f: _gaussian_blur(x, s)),
    "pixelate": ((0.6, 0.5, 0.4, 0.3, 0.25), lambda x, s, f: _pixelate(x, s)),
    "contrast": ((0.4, 0.3, 0.2, 0.1, 0.05), lambda x, s, f: _contrast(x, s)),
    "brightness": ((0.1, 0.2, 0.3, 0.4, 0.5), lambda x, s, f: x + s),
    "darken": ((0.6, 0.45, 0.3, 0.2, 0.1), lambda x, s, f: x * s),
}
DEFAULT_CORRUPTIONS = tuple(CORRUPTIONS)
DEVIATIONS = ("mahalanobis", "std")
SHRINKAGE = 0.1  # of the benign covariance of the normal scores, towards a multiple of the identity


@dataclass(frozen=True)
class TeCoOptions:
    """TeCo's settings (the constructor's keywords; see :class:`TeCo`)."""

    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severity: int = 2
    deviation: str = "mahalanobis"
    frr: float = 0.01
    batch_size: int = 256
    seed: int = 0
    accelerate: bool = True


def corruption_level(name: str, severity: int) -> tuple[str, int]:
    """``(corruption, severity)`` of one entry of ``corruptions``: a name from :data:`CORRUPTIONS`,
    at the guard's ``severity`` or at its own as ``name@S`` (``gaussian_blur@4``)."""
    base, at, level = str(name).partition("@")
    check_choice("corruption", base, CORRUPTIONS)
    if not at:
        return base, severity
    if not level.isdigit() or not 1 <= int(level) <= SEVERITIES:
        raise TrojanscanError(f"corruption {name!r}: the severity after @ must be 1 to {SEVERITIES}")
    return base, int(level)


def check_corruptions(names: object) -> tuple[str, ...]:
    """At least two distinct corruption entries (a deviation needs two): names of :data:`CORRUPTIONS`,
    each optionally with its own severity as ``name@S``."""
    values = tuple(names) if isinstance(names, (tuple, list)) else ()
    for name in values:
        corruption_level(name, 1)
    if len(values) < 2 or len(set(values)) != len(values):
        raise TrojanscanError(f"corruptions must be at least two distinct names of {', '.join(CORRUPTIONS)} "
                              f"(each may carry its own severity, as gaussian_blur@4); got {names!r}")
    return values


def normal_scores(reference: torch.Tensor, kept: torch.Tensor, *,
                  leave_one_out: bool = False) -> torch.Tensor:
    """Φ⁻¹ of each value's mid-rank among the benign values of its column.

    ``reference`` is n×K with every column sorted; ``kept`` is m×K. A fresh value v gets
    ``(below + ½·equal + ½) / (n + 1)``; with ``leave_one_out`` (``kept`` are the reference rows
    themselves) each is ranked among the other n − 1: ``(below + ½·(equal − 1) + ½) / n``.
    """
    n = reference.shape[0]
    ref, v = reference.T.contiguous().double(), kept.T.contiguous().double()
    below = torch.searchsorted(ref, v, right=False).double()
    equal = torch.searchsorted(ref, v, right=True).double() - below
    ranks = (below + 0.5 * equal) / n if leave_one_out else (below + 0.5 * equal + 0.5) / (n + 1)
    return torch.special.ndtri(ranks.T)


class TeCo(ConsistencyGuard):
    """Run-time trojaned-input detector by the deviation of corruption robustness (benign-scaled).

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits.
        corruptions: the corruption types (names in :data:`CORRUPTIONS`, each optionally at its own
            severity as ``name@S``); one forward pass each.
        severity: 1–5 on each corruption's ImageNet-C table (2 by default: mild, benign labels survive).
        deviation: ``"mahalanobis"`` (default) or ``"std"``, how the normal scores become one score.
        frr: target false rejection rate of benign inputs, which sets the threshold.
        batch_size: about how many corrupted images go to the model in one call.
        seed: draws the fixed noise fields of the noise corruptions.
        accelerate: on CPU, classify through a frozen oneDNN copy of the model where that is safe.
    """

    name = "teco"
    title = "TeCo"
    what = "a TeCo calibration"
    options_type = TeCoOptions
    _option_fields = ("corruptions", "severity", "deviation")

    def __init__(self, model: nn.Module, corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS,
                 severity: int = 2, deviation: str = "mahalanobis", frr: float = 0.01, batch_size: int = 256,
                 seed: int = 0, accelerate: bool = True) -> None:
        super().__init__(model, frr=frr, batch_size=batch_size, seed=seed, accelerate=accelerate)
        self.corruptions = check_corruptions(corruptions)
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
            raise TrojanscanError(f"severity must be a whole number from 1 to {SEVERITIES}, got {severity!r}")
        self.severity = severity
        self.deviation = check_choice("deviation", deviation, DEVIATIONS)
        self._fields: torch.Tensor | None = None

    @property
    def n_views(self) -> int:
        return len(self.corruptions)

    def _noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fixed noise fields (3×C×H×W) drawn from ``seed`` for images of ``shape``."""
        if self._fields is None or tuple(self._fields.shape[1:]) != tuple(shape):
            gen = torch.Generator().manual_seed(self.seed)
            gaussian = torch.randn(2, *shape, generator=gen)
            self._fields = torch.cat([gaussian, torch.rand(1, *shape, generator=gen)])
        return self._fields.to(device)

    def views(self, x: torch.Tensor, which: range) -> torch.Tensor:
        fields = self._noise(tuple(x.shape[1:]), x.device)
        out = []
        for j in which:
            name, severity = corruption_level(self.corruptions[j], self.severity)
            table, corrupt = CORRUPTIONS[name]
            out.append(corrupt(x, float(table[severity - 1]), fields).clamp_(0.0, 1.0))
        return torch.stack(out, 1)

    def _calibrate(self, kept: torch.Tensor) -> torch.Tensor:
        self.reference_ = kept.float().sort(0).values
        z = normal_scores(self.reference_, kept.float(), leave_one_out=True)
        self._fit_deviation(z)
        return self._deviation(z)

    def _fit_deviation(self, z: torch.Tensor) -> None:
        """The benign centre and shrunk precision matrix of the calibration normal scores ``z``."""
        cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
        target = torch.eye(len(cov), dtype=cov.dtype) * cov.diagonal().mean().clamp(min=1e-12)
        self.center_ = z.mean(0)
        self.precision_ = torch.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * target)

    def _deviation(self, z: torch.Tensor) -> torch.Tensor:
        if self.deviation == "std":
            return z.std(1)
        d = z - self.center_
        return ((d @ self.precision_) * d).sum(1)

    def _scores(self, kept: torch.Tensor) -> torch.Tensor:
        """The deviation of the benign-scaled robustness across the corruptions."""
        return self._deviation(normal_scores(self.reference_, kept.float()))

    def _extra_record(self) -> dict[str, Any]:
        return {"reference": self.reference_.numpy(), "center": self.center_.numpy(),
                "precision": self.precision_.numpy()}

    def _read_extra(self, fields: dict[str, np.ndarray], path: Path) -> None:
        k = self.n_views
        ref = _float_field(fields, "reference", (None, k), path)
        if len(ref) < 2 or (np.diff(ref, axis=0) < 0).any():
            raise TrojanscanError(f"{path}: field reference is damaged (not sorted benign values); "
                                  "recalibrate")
        self.reference_ = torch.from_numpy(ref.astype(np.float32))
        self.center_ = torch.from_numpy(_float_field(fields, "center", (k,), path).astype(np.float64))
        self.precision_ = torch.from_numpy(_float_field(fields, "precision", (k, k), path).astype(np.float64))


def _float_field(fields: dict[str, np.ndarray], key: str, shape: tuple[int | None, ...],
                 path: Path) -> np.ndarray:
    """A finite float array of ``shape`` (None: any length) from a loaded file; else a one-line error."""
    a = np.asarray(fields.get(key))
    if a.dtype.kind != "f" or a.ndim != len(shape) or not np.isfinite(a).all() or any(
            want is not None and want != got for want, got in zip(shape, a.shape, strict=True)):
        raise TrojanscanError(f"{path}: field {key} is missing or damaged; recalibrate")
    return a
