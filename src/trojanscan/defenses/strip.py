"""STRIP (Gao et al., ACSAC 2019): flag trojaned inputs at run time by the entropy of perturbed copies.

An input is superimposed with N random clean images and all N copies are classified. A clean input's
predictions scatter (high entropy); a stamped input keeps predicting the attack's target because the
trigger survives the overlay (low entropy). Inputs whose mean entropy falls below a boundary fitted on
benign inputs for a chosen false rejection rate (FRR) are flagged as trojaned.

Two additions to the paper: a softmax ``temperature`` (``"auto"`` picks the one that makes the benign
entropies most symmetric, so the paper's normal fit holds on over-confident models), and exact early
exit in :meth:`Strip.detect`: per-copy entropies are never negative, so once an input's partial sum
passes ``boundary · N`` it is benign whatever its remaining copies give, and it stops being copied.

Example::

    strip = Strip(model, n=100).calibrate(clean_images)
    labels, trojaned = strip.predict(incoming_images)
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trojanscan.defenses.base import InputGuard
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import load_npz_record, module_sha256, save_npz_record, tensor_sha256
from trojanscan.models.inference import Classifier
from trojanscan.models.modes import evaluating
from trojanscan.validation import (
    SEED,
    STRIP_COPIES,
    check_choice,
    check_fraction,
    check_images,
    check_number,
)

MIN_CALIBRATION_SAMPLES = 20
BLENDS = ("add", "alpha")
BOUNDARY_METHODS = ("normal", "quantile")
FILE_FORMAT_VERSION = 2  # 2 added the temperature; version 1 files load with temperature 1
MAX_TEMPERATURE = 1000.0  # far above the grid; a huge one makes every input look benign
TEMPERATURE_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
_LN2 = math.log(2.0)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy in bits of the N perturbed copies of each input.

    Args:
        probs: ``(..., N, K)`` softmax outputs: N copies, K classes.
    Returns:
        ``(...,)`` tensor: ``(1/N) · Σ_n −Σ_i p_{n,i} log2 p_{n,i}``, with ``0 · log 0 = 0``.
    """
    if probs.dim() < 2:
        raise TrojanscanError(f"probabilities must be (..., N, K), got shape {tuple(probs.shape)}")
    return copy_entropies(probs).mean(-1)


def copy_entropies(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits over the last axis (one value per copy), never below 0."""
    return (-torch.special.xlogy(probs, probs).sum(-1) / _LN2).clamp_(min=0.0)  # xlogy(0, 0) == 0


def skewness(values: torch.Tensor) -> float:
    """Sample skewness (third standardised moment); 0 for a symmetric sample, NaN if constant."""
    h = torch.as_tensor(values, dtype=torch.float64).flatten()
    sd = float(h.std(unbiased=False))
    return float(((h - h.mean()) / sd).pow(3).mean()) if sd > 0 else float("nan")


def pick_temperature(entropies_by_t: dict[float, torch.Tensor]) -> float:
    """The temperature whose benign entropies are the most symmetric (|skewness| smallest).

    The paper's boundary assumes normal benign entropies; an over-confident model piles them up
    near 0 (strong right skew) and the fitted 1% point falls below zero, flagging nothing.
    """
    scored = [(abs(s), t) for t, h in entropies_by_t.items() if math.isfinite(s := skewness(h))]
    if not scored:
        return min(entropies_by_t)
    return min(scored)[1]


def detection_boundary(entropies: torch.Tensor, frr: float, method: str = "normal") -> float:
    """The entropy below which an input is called trojaned, so that about ``frr`` of benign ones are.

    ``"normal"`` fits N(mu, sigma) to the benign entropies and takes ``mu + sigma · Φ⁻¹(frr)`` (the
    paper's choice); ``"quantile"`` takes the empirical ``frr``-quantile (TrojanZoo's choice).
    """
    check_fraction("frr", frr)
    check_choice("boundary method", method, BOUNDARY_METHODS)
    h = torch.as_tensor(entropies, dtype=torch.float64).flatten()
    if len(h) < 2:
        raise TrojanscanError(f"a boundary needs at least 2 benign entropies, got {len(h)}")
    if not torch.isfinite(h).all():
        raise TrojanscanError("benign entropies contain NaN or infinity; check the model's outputs")
    if method == "quantile":
        return float(torch.quantile(h, frr))
    mu, sigma = float(h.mean()), float(h.std())
    return mu + sigma * statistics.NormalDist().inv_cdf(frr)


def parse_temperature(value: float | str) -> float | str:
    """A positive finite softmax temperature up to :data:`MAX_TEMPERATURE`, or ``"auto"``; a number
    given as text is converted."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise TrojanscanError(f"temperature must be a positive number or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_TEMPERATURE:
        raise TrojanscanError(f"temperature must be a positive number up to {MAX_TEMPERATURE:g} or 'auto', "
                              f"got {value!r}")
    return float(value)


class _ScalarReader:
    """Typed scalar fields of a loaded ``.npz``; a damaged one is a one-line error, not a crash."""

    def __init__(self, fields: dict[str, np.ndarray], path: Path) -> None:
        self.fields, self.path = fields, path

    def _get(self, key: str, kinds: str) -> np.ndarray:
        value = np.asarray(self.fields[key])
        if value.ndim != 0 or value.dtype.kind not in kinds:
            raise TrojanscanError(f"{self.path}: field {key} is damaged (a {value.dtype} array of shape "
                                  f"{value.shape}); recalibrate")
        return value

    def int(self, key: str) -> int:
        return int(self._get(key, "iu"))

    def float(self, key: str) -> float:
        return float(self._get(key, "iuf"))

    def text(self, key: str) -> str:
        return str(self._get(key, "U"))


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@dataclass(frozen=True)
class StripOptions:
    """STRIP's settings (the constructor's keywords; see :class:`Strip`)."""

    n: int = 100
    blend: str = "add"
    alpha: float = 0.5
    frr: float = 0.01
    boundary: str = "normal"
    batch_size: int = 256
    seed: int = 0
    temperature: float | str = 1.0
    accelerate: bool = True


class Strip(InputGuard):
    """Run-time trojaned-input detector: ``Strip(model).calibrate(clean)`` then ``.detect(x)``.

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits.
        n: perturbed copies per input (the paper uses 100; 10–20 often suffice).
        blend: ``"add"`` superimposes at full weight and saturates at 1 (the authors' choice);
            ``"alpha"`` blends ``(1 − alpha) · x + alpha · overlay``.
        alpha: overlay weight for ``blend="alpha"``.
        frr: target false rejection rate of benign inputs, which sets the boundary.
        boundary: ``"normal"`` (the paper) or ``"quantile"`` (empirical); see :func:`detection_boundary`.
        temperature: divides the logits before the softmax; 1 is the paper. ``"auto"`` picks one
            from :data:`TEMPERATURE_GRID` at calibration (see :func:`pick_temperature`).
        batch_size: about how many perturbed images go to the model in one call.
        accelerate: on CPU, classify the copies with a frozen oneDNN copy of the model (2-3× faster
            on the reference nets; same logits to ~1e-6) where that is safe; see
            :func:`~trojanscan.models.inference.frozen_for_inference`. Other models run as they are.
        seed: seeds the choice of overlays, so the same inputs in the same order give the same entropies.
    """

    name = "strip"
    title = "STRIP"
    options_type = StripOptions

    def __init__(self, model: nn.Module, n: int = 100, blend: str = "add", alpha: float = 0.5,
                 frr: float = 0.01, boundary: str = "normal", batch_size: int = 256, seed: int = 0,
                 temperature: float | str = 1.0, accelerate: bool = True):
        if not isinstance(model, nn.Module):
            raise TrojanscanError(f"model must be a torch nn.Module, got {type(model).__name__}")
        check_number("n", n, STRIP_COPIES)
        check_number("seed", seed, SEED)
        check_choice("blend", blend, BLENDS)
        if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise TrojanscanError(f"alpha must be in (0, 1], got {alpha!r}")
        check_fraction("frr", frr)
        check_choice("boundary method", boundary, BOUNDARY_METHODS)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TrojanscanError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.n = n
        self.blend = blend
        self.alpha = float(alpha)
        self.frr = float(frr)
        self.boundary = boundary
        self.batch_size = batch_size
        self.accelerate = bool(accelerate)
        self._runner = Classifier(model, self.accelerate)
        self.seed = int(seed)
        self.temperature = parse_temperature(temperature)
        if self.temperature != "auto":
            self.temperature_ = self.temperature

    # -- calibration ------------------------------------------------------------------------------

    def calibrate(self, x_benign: torch.Tensor, overlay_pool: torch.Tensor | None = None) -> Strip:
        """Fit the entropy boundary on benign inputs; overlays come from ``overlay_pool`` (default: them).

        Returns ``self``, with ``overlays_``, ``temperature_``, ``entropy_mean_``, ``entropy_std_``,
        ``boundary_``, ``calibration_entropies_``, ``calibration_sha256_`` and ``n_calibration_`` set.
        """
        check_images(x_benign, "benign calibration images")
        if len(x_benign) < MIN_CALIBRATION_SAMPLES:
            raise TrojanscanError(f"STRIP calibration needs at least {MIN_CALIBRATION_SAMPLES} benign "
                                  f"images, got {len(x_benign)}; pass more clean images")
        pool = x_benign if overlay_pool is None else overlay_pool
        check_images(pool, "overlay pool images")
        if len(pool) == 0:
            raise TrojanscanError("the overlay pool is empty; pass held-out clean images")
        if pool.shape[1:] != x_benign.shape[1:]:
            raise TrojanscanError(f"overlay pool images are {tuple(pool.shape[1:])} but the benign images "
                                  f"are {tuple(x_benign.shape[1:])}; use images of the same size")
        self.overlays_ = pool.detach().to("cpu", torch.float32).contiguous().clone()
        self._check_model_runs()
        grid = TEMPERATURE_GRID if self.temperature == "auto" else (self.temperature,)
        by_t = self._entropies(x_benign, grid)
        self.temperature_ = pick_temperature(dict(zip(grid, by_t.T, strict=True)))
        h = by_t[:, grid.index(self.temperature_)].contiguous()
        self.calibration_entropies_ = h
        self.entropy_mean_ = float(h.double().mean())
        self.entropy_std_ = float(h.double().std())
        self.boundary_ = detection_boundary(h, self.frr, self.boundary)
        if self.boundary_ <= 0:
            warnings.warn(self.degenerate_message(), stacklevel=2)
        self.n_calibration_ = len(x_benign)
        self.calibration_sha256_ = tensor_sha256(x_benign.detach().to("cpu", torch.float32), self.overlays_)
        self.model_sha256_ = module_sha256(self.model)
        return self

    def fit(self, x: torch.Tensor, overlay_pool: torch.Tensor | None = None) -> Strip:  # type: ignore[override]
        """The guard contract's name for :meth:`calibrate`."""
        return self.calibrate(x, overlay_pool)

    def degenerate_message(self) -> str:
        """Why a boundary at or below 0 bits is useless, and what to try."""
        return (f"STRIP boundary {self.boundary_:.4f} bits is not above 0, so no input can be flagged: "
                f"benign entropies are too low or too skewed for the {self.boundary} fit; try "
                "temperature 'auto', the quantile boundary or more copies")

    def _check_model_runs(self) -> None:
        """One probe so that a model unfit for these images fails with one clear line."""
        try:
            with evaluating(self.model), torch.no_grad():
                out = self.model(self.overlays_[:2].to(_model_device(self.model)))
        except Exception as e:  # any shape error inside a foreign model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrojanscanError(
                f"model cannot run on images of shape {tuple(self.overlays_.shape[1:])} ({first})") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TrojanscanError("model must return a batch×classes tensor of logits; wrap it so that "
                                  "forward() does")

    def _require_calibrated(self) -> None:
        if not hasattr(self, "boundary_"):
            raise TrojanscanError("this Strip detector is not calibrated; call calibrate(clean_images) "
                                  "or Strip.load(path, model) first")

    # -- scoring ----------------------------------------------------------------------------------

    def _superimpose(self, x: torch.Tensor, overlays: torch.Tensor) -> torch.Tensor:
        """x: m×1×C×H×W, overlays: m×N×C×H×W → m×N×C×H×W perturbed copies."""
        if self.blend == "add":
            return (x + overlays).clamp_(0.0, 1.0)
        return (1 - self.alpha) * x + self.alpha * overlays

    def _overlay_indices(self, m: int) -> torch.Tensor:
        """m×N overlay indices, drawn up front from ``seed`` so results do not depend on batching."""
        if not hasattr(self, "overlays_"):
            self._require_calibrated()
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(len(self.overlays_), (m, self.n), generator=gen)

    @property
    def accelerated(self) -> bool:
        """Whether the copies went through a frozen copy of the model in the last call."""
        return self._runner.accelerated

    def _classifying(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The classifying module (the model, or its frozen copy checked on the overlays), with the
        model in eval mode and no gradients; nested uses (``predict`` = ``screen`` + ``labels``)
        share the outer one, so the weights are fingerprinted once per public call."""
        return self._runner.running(getattr(self, "overlays_", torch.empty(0)))

    def _copy_logits(self, classify: nn.Module, x: torch.Tensor,
                     idx: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, logits)`` for inputs ``x`` superimposed with ``overlays_[idx]``.

        ``classify`` comes from :meth:`_classifying`; ``idx`` is m×k; each chunk of about
        ``batch_size`` copies gives logits (chunk, k, classes).
        """
        k = idx.shape[1]
        device = _model_device(self.model)
        step = max(1, self.batch_size // k)
        for i in range(0, len(x), step):
            xb = x[i:i + step].to(device, torch.float32).unsqueeze(1)
            copies = self._superimpose(xb, self.overlays_[idx[i:i + step]].to(device))
            yield i, classify(copies.flatten(0, 1)).float().view(len(xb), k, -1)

    def _entropies(self, x: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
        """(m, len(temperatures)) normalised entropies of all N copies, one column per temperature."""
        check_images(x, "input images", tuple(self.overlays_.shape[1:]))
        with self._classifying() as classify:
            out = [torch.stack([copy_entropies(torch.softmax(logits / t, -1)).mean(-1)
                                for t in temperatures], dim=1).cpu()
                   for _, logits in self._copy_logits(classify, x, self._overlay_indices(len(x)))]
        return torch.cat(out) if out else torch.empty(0, len(temperatures))

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised entropy (bits) of each input's N perturbed copies; low means likely trojaned.

        All M×N copies are classified in chunks of about ``batch_size`` images; the result does not
        depend on ``batch_size``.
        """
        self._require_calibrated()
        return self._entropies(x, (self.temperature_,))[:, 0].contiguous()

    def screen(self, x: torch.Tensor, rounds: int = 10,
               need: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flags of ``entropy(x) < boundary_`` (up to float rounding within ~1e-7 of the boundary),
        copying each input only until its verdict is sure. ``need``: instead of ``boundary_ · N``, each
        input's own entropy-sum boundary (the combined guard's pooled rule sets them).

        Copies go in ``rounds`` rounds of about N/rounds. After each, an input whose entropy sum
        already reaches ``boundary_ · N`` is benign (entropies are ≥ 0), and one that stays below
        even if every remaining copy had the maximum entropy is trojaned; both stop there.

        Returns ``(flags, entropy_sum, copies_used)``: the sum over the copies used, so an input
        that used all N copies has entropy ``entropy_sum / N``.
        """
        self._require_calibrated()
        check_images(x, "input images", tuple(self.overlays_.shape[1:]))
        m = len(x)
        idx = self._overlay_indices(m)
        total = torch.zeros(m, dtype=torch.float64)
        used = torch.zeros(m, dtype=torch.int64)
        need = (torch.full((m,), self.boundary_ * self.n, dtype=torch.float64) if need is None
                else torch.as_tensor(need, dtype=torch.float64).flatten())
        tol = 1e-6 * need.abs().clamp(min=1.0)
        step = max(1, math.ceil(self.n / max(1, rounds)))
        active = torch.arange(m)
        done = 0
        with self._classifying() as classify:
            while len(active) and done < self.n:
                k = min(step, self.n - done)
                h_max = 0.0
                for start, logits in self._copy_logits(classify, x[active], idx[active, done:done + k]):
                    rows = active[start:start + len(logits)]
                    probs = torch.softmax(logits / self.temperature_, -1)
                    total[rows] += copy_entropies(probs).sum(-1).double().cpu()
                    h_max = math.log2(logits.shape[-1])
                done += k
                used[active] = done
                left = (self.n - done) * h_max
                sure = (total[active] >= need[active] + tol[active]) | (
                    total[active] + left < need[active] - tol[active])
                active = active[~sure]
        return total < need, total, used

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean flags, True where an input is called trojaned (entropy below ``boundary_``)."""
        return self.screen(x)[0]

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's labels for the unperturbed inputs (by the same module that classifies copies)."""
        self._require_calibrated()
        with self._classifying() as classify:
            out = [classify(x[i:i + self.batch_size].to(_model_device(self.model), torch.float32))
                   .argmax(1).cpu() for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for the unperturbed inputs and STRIP's trojaned flags."""
        with self._classifying():
            flags = self.detect(x)
            return self.labels(x), flags

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Save the calibration as an ``.npz`` of plain arrays (no pickles), atomically."""
        self._require_calibrated()
        save_npz_record(path, {
            "format_version": np.int64(FILE_FORMAT_VERSION), "overlays": self.overlays_.numpy(),
            "overlays_sha256": tensor_sha256(self.overlays_),
            "entropy_mean": np.float64(self.entropy_mean_), "entropy_std": np.float64(self.entropy_std_),
            "boundary_value": np.float64(self.boundary_), "boundary": self.boundary,
            "n": np.int64(self.n), "blend": self.blend, "alpha": np.float64(self.alpha),
            "seed": np.int64(self.seed), "frr": np.float64(self.frr),
            "temperature": np.float64(self.temperature_), "temperature_request": str(self.temperature),
            "n_calibration": np.int64(self.n_calibration_), "calibration_sha256": self.calibration_sha256_,
            "model_sha256": self.model_sha256_})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, batch_size: int = 256,
             accelerate: bool = True) -> Strip:
        """Read a detector saved by :meth:`save` for the same ``model``; never unpickles."""
        path = Path(path)
        required = {"format_version", "overlays", "overlays_sha256", "entropy_mean", "entropy_std",
                    "boundary_value", "boundary", "n", "blend", "alpha", "seed", "frr", "n_calibration",
                    "calibration_sha256", "model_sha256"}
        fields = load_npz_record(path, "STRIP calibration", required, fix="; recalibrate")
        num = _ScalarReader(fields, path)
        version = num.int("format_version")
        if version not in (1, FILE_FORMAT_VERSION):
            raise TrojanscanError(f"{path}: STRIP file format {version} is not "
                                  f"supported (expected {FILE_FORMAT_VERSION}); recalibrate")
        if version >= 2 and not {"temperature", "temperature_request"} <= set(fields):
            raise TrojanscanError(f"{path}: not a STRIP calibration file (missing temperature)")
        overlays = torch.from_numpy(np.ascontiguousarray(fields["overlays"], dtype=np.float32))
        try:
            check_images(overlays, f"{path}: overlays")
        except TrojanscanError as e:
            raise TrojanscanError(f"{e}; the file is damaged, recalibrate") from None
        if len(overlays) == 0 or tensor_sha256(overlays) != num.text("overlays_sha256"):
            raise TrojanscanError(f"{path}: overlays do not match their checksum; the file is damaged, "
                                  "recalibrate")
        temperature = num.float("temperature") if version >= 2 else 1.0
        try:
            strip = cls(model, n=num.int("n"), blend=num.text("blend"), alpha=num.float("alpha"),
                        frr=num.float("frr"), boundary=num.text("boundary"), batch_size=batch_size,
                        seed=num.int("seed"), temperature=temperature, accelerate=accelerate)
            if version >= 2:
                strip.temperature = parse_temperature(num.text("temperature_request"))
        except TrojanscanError as e:
            raise TrojanscanError(f"{path}: {e}") from None
        if strip.temperature not in ("auto", temperature):
            raise TrojanscanError(f"{path}: temperature {temperature:g} contradicts the requested "
                                  f"{strip.temperature}; the file is damaged, recalibrate")
        numbers = {k: num.float(k) for k in ("entropy_mean", "entropy_std", "boundary_value")}
        bad = [k for k, v in numbers.items() if not math.isfinite(v)]
        if bad:
            raise TrojanscanError(f"{path}: {', '.join(bad)} not finite; the file is damaged, recalibrate")
        if module_sha256(model) != num.text("model_sha256"):
            raise TrojanscanError(f"{path}: calibrated for a different model (weights differ); "
                                  "recalibrate STRIP on this model")
        strip.overlays_ = overlays
        strip.entropy_mean_ = numbers["entropy_mean"]
        strip.entropy_std_ = numbers["entropy_std"]
        strip.boundary_ = numbers["boundary_value"]
        strip.n_calibration_ = num.int("n_calibration")
        strip.calibration_sha256_ = num.text("calibration_sha256")
        strip.model_sha256_ = num.text("model_sha256")
        strip._check_model_runs()
        return strip
