"""The shared engine of the guards that watch how an input's predicted label holds up when the input
(or the model) is changed in K fixed ways: SCALE-UP (amplified pixels) and TeCo (image corruptions).

For each input the model's label ``y0`` is taken first, then the log-odds the model still gives
``y0`` on each of the K views (``kept``, an m×K matrix: log p/(1 − p), taken from the logits as
``z_y0 − logsumexp(other logits)`` so that confident predictions keep their order instead of all
rounding to probability 1); each method turns that row into one suspicion score (higher = more
likely trojaned). Calibration needs benign inputs only: the
threshold is the conformal upper quantile of their scores (:func:`upper_threshold`), so a fresh
benign input from the same distribution is flagged with probability at most ``frr``.

This module also holds the chores every guard shares: the frozen oneDNN copy of the model on CPU
(:class:`Classifier`), and the checks when a calibration file is read (:func:`check_same_model`).
"""

from __future__ import annotations

import math
import os
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from trojanscan.defenses.base import InputGuard
from trojanscan.defenses.strip import _model_device as model_device
from trojanscan.defenses.strip import _ScalarReader as FieldReader
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import load_npz_record, module_sha256, save_npz_record, tensor_sha256
from trojanscan.models.inference import Classifier
from trojanscan.models.modes import evaluating
from trojanscan.validation import SEED, check_fraction, check_images, check_number

MIN_CALIBRATION_SAMPLES = 20

__all__ = ["MIN_CALIBRATION_SAMPLES", "CalibratedGuard", "Classifier", "ConsistencyGuard", "FieldReader",
           "LabelKeepingGuard", "check_same_model", "model_device", "tail_count", "upper_threshold"]


def tail_count(n: int, frr: float) -> int:
    """How many of ``n`` benign calibration scores may lie above the threshold so that a fresh
    benign input is flagged with probability at most ``frr``: ``⌊frr·(n+1)⌋ − 1`` (−1 when even
    the largest score is not enough; see :func:`upper_threshold`)."""
    return math.floor(check_fraction("frr", frr) * (n + 1) + 1e-9) - 1


def upper_threshold(scores: torch.Tensor, frr: float, *, what: str = "benign scores") -> float:
    """The score above which an input is flagged, so that about ``frr`` of benign ones are.

    The conformal quantile: the (k+1)-th largest of the n benign scores with k = ⌊frr·(n+1)⌋ − 1.
    A fresh benign input exceeds it with probability (k+1)/(n+1) ≤ frr (ties only lower it). Too
    few scores for ``frr`` (k < 0) give the largest score and a :class:`TrojanscanWarning`.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if len(s) < 2:
        raise TrojanscanError(f"a threshold needs at least 2 {what}, got {len(s)}")
    if not torch.isfinite(s).all():
        raise TrojanscanError(f"{what} contain NaN or infinity; check the model's outputs")
    k = tail_count(len(s), frr)
    if k < 0:
        warnings.warn(f"{len(s)} {what} are too few for FRR {frr:g} (at least {math.ceil(1 / frr) - 1} "
                      f"needed); the threshold is the largest score, FRR about {1 / (len(s) + 1):.2g}",
                      TrojanscanWarning, stacklevel=2)
        k = 0
    return float(s.sort(descending=True).values[k])


def check_same_model(path: Path, model: nn.Module, recorded: str, what: str) -> None:
    """Refuse a calibration made for other weights: its thresholds mean nothing for this model."""
    if module_sha256(model) != recorded:
        raise TrojanscanError(f"{path}: calibrated for a different model (weights differ); "
                              f"recalibrate {what} on this model")


class CalibratedGuard(InputGuard):
    """Base of the guards that turn each input into one suspicion score and flag it above a conformal
    threshold on benign scores: the checks, the threshold, labels, files.

    A subclass defines :meth:`_fit_scores` (calibrate any state on benign images, return their
    scores) and :meth:`_input_scores`, and may keep calibration state in files
    (:meth:`_extra_record`, :meth:`_read_extra`).
    """

    what: ClassVar[str]  # how errors and files name the method ("SCALE-UP calibration")
    FORMAT_VERSION: ClassVar[int] = 1
    _option_fields: ClassVar[tuple[str, ...]] = ()  # the subclass's own option fields, saved in files

    def __init__(self, model: nn.Module, *, frr: float, batch_size: int, seed: int, accelerate: bool) -> None:
        if not isinstance(model, nn.Module):
            raise TrojanscanError(f"model must be a torch nn.Module, got {type(model).__name__}")
        check_fraction("frr", frr)
        check_number("seed", seed, SEED)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TrojanscanError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.frr, self.batch_size, self.seed = model, float(frr), batch_size, int(seed)
        self.accelerate = bool(accelerate)
        self._classifier = Classifier(model, accelerate)

    # -- what a method defines --------------------------------------------------------------------

    @abstractmethod
    def _fit_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Fit any state on benign images ``x`` and return their suspicion scores."""

    @abstractmethod
    def _input_scores(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Suspicion scores of images ``x`` (higher = more likely trojaned); ``labels``: the model's
        labels for ``x`` if the caller has them."""

    def _extra_record(self) -> dict[str, Any]:
        """Calibration state beyond the threshold, for :meth:`save`."""
        return {}

    def _read_extra(self, fields: dict[str, np.ndarray], path: Path) -> None:
        """Restore what :meth:`_extra_record` saved; a damaged field is a one-line error."""

    # -- calibration ------------------------------------------------------------------------------

    def fit(self, x: torch.Tensor) -> CalibratedGuard:  # type: ignore[override]
        """Calibrate on benign images ``x``: the threshold flags about ``frr`` of them. Returns ``self``
        with ``threshold_``, ``calibration_scores_``, ``n_calibration_`` and the hashes set."""
        check_images(x, "benign calibration images")
        if len(x) < MIN_CALIBRATION_SAMPLES:
            raise TrojanscanError(f"{self.title} calibration needs at least {MIN_CALIBRATION_SAMPLES} benign "
                                  f"images, got {len(x)}; pass more clean images")
        self.input_shape_ = tuple(int(d) for d in x.shape[1:])
        self._check_model_runs(x[:2])
        scores = self._fit_scores(x)
        self.calibration_scores_ = scores.double()
        self.threshold_ = upper_threshold(scores, self.frr, what=f"{self.title} benign scores")
        self.n_calibration_ = len(x)
        self.calibration_sha256_ = tensor_sha256(x.detach().to("cpu", torch.float32))
        self.model_sha256_ = module_sha256(self.model)
        return self

    def _check_model_runs(self, probe: torch.Tensor) -> None:
        """One probe so that a model unfit for these images fails with one clear line."""
        try:
            with evaluating(self.model), torch.no_grad():
                out = self.model(probe.to(model_device(self.model), torch.float32))
        except Exception as e:  # any shape error inside a foreign model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrojanscanError(f"model cannot run on images of shape {tuple(probe.shape[1:])} "
                                  f"({first})") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TrojanscanError("model must return a batch×classes tensor of logits; wrap it so that "
                                  "forward() does")

    def _require_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise TrojanscanError(f"this {self.title} guard is not calibrated; call fit(clean_images) or "
                                  f"{type(self).__name__}.load(path, model) first")

    def _check_inputs(self, x: torch.Tensor) -> None:
        self._require_fitted()
        if isinstance(x, torch.Tensor) and x.dim() == 4 and tuple(x.shape[1:]) != self.input_shape_:
            raise TrojanscanError(f"input images are {tuple(x.shape[1:])} but {self.title} was calibrated "
                                  f"on {self.input_shape_}; pass images of that size")
        check_images(x, "input images")

    # -- scoring ----------------------------------------------------------------------------------

    @property
    def accelerated(self) -> bool:
        """Whether the last call classified through a frozen copy of the model."""
        return self._classifier.accelerated

    def _chunks(self, x: torch.Tensor, k: int) -> Iterator[tuple[int, torch.Tensor]]:
        step = max(1, self.batch_size // max(1, k))
        for i in range(0, len(x), step):
            yield i, x[i:i + step].to(model_device(self.model), torch.float32)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's labels for the unchanged inputs (by the module that classifies the views)."""
        if len(x) == 0:
            return torch.empty(0, dtype=torch.long)
        with self._classifier.running(x) as classify:
            return torch.cat([classify(xb).argmax(1).cpu() for _, xb in self._chunks(x, 1)])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Each input's suspicion score from all K views; above ``threshold_`` means flagged."""
        self._check_inputs(x)
        return self._input_scores(x).double()

    def screen(self, x: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flags, views_used)``: the flags of ``score(x) > threshold_`` and how many views of each
        input were looked at (one here; see :meth:`ConsistencyGuard.screen`). ``labels``: the model's
        labels for ``x`` when the caller has them already (:meth:`labels`)."""
        self._check_inputs(x)
        return self._input_scores(x, labels) > self.threshold_, torch.ones(len(x), dtype=torch.int64)

    def detect(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean flags, True where an input is called trojaned (``labels``: as for :meth:`screen`)."""
        return self.screen(x, labels)[0]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for the unchanged inputs and the guard's flags."""
        with self._classifier.running(x):
            labels = self.labels(x)
            return labels, self.detect(x, labels)

    # -- persistence ------------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """The calibration as named plain arrays (what :meth:`save` writes)."""
        self._require_fitted()
        options = {f: np.asarray(getattr(self, f)) for f in self._option_fields}
        return {"format_version": np.int64(self.FORMAT_VERSION), "method": self.name,
                "input_shape": np.asarray(self.input_shape_, dtype=np.int64),
                "threshold": np.float64(self.threshold_), "frr": np.float64(self.frr),
                "seed": np.int64(self.seed), "calibration_scores": self.calibration_scores_.numpy(),
                "n_calibration": np.int64(self.n_calibration_),
                "calibration_sha256": self.calibration_sha256_, "model_sha256": self.model_sha256_,
                **options, **self._extra_record()}

    def save(self, path: str | os.PathLike) -> None:
        """Save the calibration as an ``.npz`` of plain arrays (no pickles), atomically."""
        save_npz_record(path, self.to_record())

    @classmethod
    def from_record(cls, fields: dict[str, np.ndarray], path: Path, model: nn.Module,
                    **settings: Any) -> CalibratedGuard:
        """Rebuild a guard for ``model`` from :meth:`to_record`'s arrays; refuses another model."""
        required = {"format_version", "method", "input_shape", "threshold", "frr", "seed",
                    "calibration_scores", "n_calibration", "calibration_sha256", "model_sha256",
                    *cls._option_fields}
        missing = sorted(required - set(fields))
        if missing:
            raise TrojanscanError(f"{path}: not {cls.what} file (missing {', '.join(missing)}); recalibrate")
        num = FieldReader(fields, path)
        if num.text("method") != cls.name or num.int("format_version") != cls.FORMAT_VERSION:
            raise TrojanscanError(f"{path}: not {cls.what} file of format {cls.FORMAT_VERSION} (it holds "
                                  f"{num.text('method')!r}, format {num.int('format_version')}); recalibrate")
        try:
            options = {f: cls._read_option(f, fields[f]) for f in cls._option_fields}
            guard = cls(model, frr=num.float("frr"), seed=num.int("seed"), **options, **settings)
            shape = np.asarray(fields["input_shape"])
            scores = np.asarray(fields["calibration_scores"])
            if shape.ndim != 1 or shape.dtype.kind not in "iu" or scores.ndim != 1 \
                    or scores.dtype.kind != "f":
                raise TrojanscanError("input_shape or calibration_scores is damaged")
        except (TrojanscanError, ValueError, TypeError) as e:
            raise TrojanscanError(f"{path}: {e}; the file is damaged, recalibrate") from None
        threshold = num.float("threshold")
        if not math.isfinite(threshold) or not np.isfinite(scores).all():
            raise TrojanscanError(f"{path}: threshold or scores not finite; the file is damaged, recalibrate")
        check_same_model(path, model, num.text("model_sha256"), cls.title)
        guard.input_shape_ = tuple(int(d) for d in shape)
        guard.threshold_ = threshold
        guard.calibration_scores_ = torch.from_numpy(scores.astype(np.float64))
        guard.n_calibration_ = num.int("n_calibration")
        guard.calibration_sha256_ = num.text("calibration_sha256")
        guard.model_sha256_ = num.text("model_sha256")
        guard._read_extra(fields, path)
        guard._check_model_runs(torch.zeros(2, *guard.input_shape_))
        return guard

    @staticmethod
    def _read_option(name: str, value: np.ndarray) -> Any:
        """An option field as the constructor takes it: a scalar, or a tuple for a 1-D array."""
        value = np.asarray(value)
        if value.ndim == 1:
            return tuple(v.item() for v in value)
        if value.ndim == 0:
            return value.item()
        raise TrojanscanError(f"field {name} has shape {value.shape}")

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, batch_size: int = 256,
             accelerate: bool = True) -> CalibratedGuard:
        """Read a calibration written by :meth:`save` for the same ``model``; never unpickles."""
        path = Path(path)
        fields = load_npz_record(path, f"{cls.title} calibration", fix="; recalibrate")
        return cls.from_record(fields, path, model, batch_size=batch_size, accelerate=accelerate)


class ConsistencyGuard(CalibratedGuard):
    """Base of the guards that score each input from ``kept``: the log-odds of its label on K views.

    A subclass defines :attr:`n_views`, :meth:`views` and :meth:`_scores`, and may keep calibration
    state (:meth:`_calibrate`, :meth:`_extra_record`, :meth:`_read_extra`). One whose score is minus
    the mean over the views of a term in [0, 1] sets :attr:`mean_score` and defines :meth:`_terms`,
    which lets :meth:`screen` stop early, as STRIP does.
    """

    mean_score: ClassVar[bool] = False

    @property
    @abstractmethod
    def n_views(self) -> int:
        """K, the views of each input."""

    @abstractmethod
    def views(self, x: torch.Tensor, which: range) -> torch.Tensor:
        """The views ``which`` of images ``x`` (m×C×H×W): an m×len(which)×C×H×W tensor in [0, 1]."""

    @abstractmethod
    def _scores(self, kept: torch.Tensor) -> torch.Tensor:
        """m×K kept log-odds → m suspicion scores (higher = more likely trojaned)."""

    def _view_logits(self, classify: nn.Module, x: torch.Tensor, which: range) -> torch.Tensor:
        """The model's logits on views ``which`` of images ``x``: an m×len(which)×classes tensor
        (default: ``classify`` on :meth:`views`; a method that changes the model overrides it)."""
        return classify(self.views(x, which).flatten(0, 1)).float().view(len(x), len(which), -1)

    def _terms(self, kept: torch.Tensor) -> torch.Tensor | None:
        """For a :attr:`mean_score` method: the per-view terms in [0, 1] whose mean is minus the score;
        ``None`` for the others (their score is not such a mean)."""
        return None

    def _fit_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self._calibrate(self.kept(x)[1])

    def _input_scores(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._scores(self.kept(x, labels=labels)[1])

    def _calibrate(self, kept: torch.Tensor) -> torch.Tensor:
        """Fit any state from the benign ``kept`` and return their scores (default: :meth:`_scores`)."""
        return self._scores(kept)

    def kept(self, x: torch.Tensor, which: range | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels, kept)``: each input's label and the log-odds of it on views ``which`` (default
        all K), an m×len(which) tensor. The result does not depend on ``batch_size``."""
        which = range(self.n_views) if which is None else which
        with self._classifier.running(x) as classify:
            labels = self.labels(x) if labels is None else labels
            out = []
            for i, xb in self._chunks(x, len(which)):
                logits = self._view_logits(classify, xb, which)
                y = labels[i:i + len(xb)].to(logits.device).view(-1, 1, 1).expand(-1, len(which), 1)
                others = torch.logsumexp(logits.scatter(2, y, -math.inf), -1)
                out.append((logits.gather(2, y)[..., 0] - others).cpu())
        return labels, (torch.cat(out) if out else torch.empty(0, len(which)))

    def screen(self, x: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flags, views_used)``: the flags of ``score(x) > threshold_``, viewing each input only until
        its verdict is sure where the score is minus a mean of terms in [0, 1] (:attr:`mean_score`):
        once the partial sum of the terms reaches ``−threshold_ · K`` the input is benign, and once
        even K − j more terms of 1 cannot reach it, it is flagged. Other methods use all K views.
        ``labels``: the model's labels for ``x`` when the caller has them already (:meth:`labels`)."""
        if not self.mean_score:
            flags = super().screen(x, labels)[0]
            return flags, torch.full((len(x),), self.n_views)
        self._check_inputs(x)
        k, m = self.n_views, len(x)
        need, total = -self.threshold_ * k, torch.zeros(m, dtype=torch.float64)
        tol = 1e-9 * abs(need)
        used, active = torch.zeros(m, dtype=torch.int64), torch.arange(m)
        with self._classifier.running(x):
            labels = self.labels(x) if labels is None else labels
            for j in range(k):
                if not len(active):
                    break
                kept = self.kept(x[active], range(j, j + 1), labels[active])[1]
                terms = self._terms(kept)
                assert terms is not None, "a mean_score method defines _terms"
                total[active] += terms[:, 0].double()
                used[active] = j + 1
                sure = (total[active] >= need + tol) | (total[active] + (k - j - 1) < need - tol)
                active = active[~sure]
        return total < need, used


class LabelKeepingGuard(ConsistencyGuard):
    """A guard whose suspicion is how surely an input keeps its label on every view: minus the mean
    over the views of the probability of *losing* it, 1 − p (the soft form of the share of views
    that keep the label). Taken from the log-odds, so confident predictions keep their order instead
    of all rounding to p = 1 (which would leave a benign tail of ties and a threshold that flags
    nothing); a mean of terms in [0, 1], so :meth:`screen` can stop early."""

    mean_score = True

    def _terms(self, kept: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-kept.double())  # 1 − p, exact near p = 1

    def _scores(self, kept: torch.Tensor) -> torch.Tensor:
        return -self._terms(kept).mean(1)
