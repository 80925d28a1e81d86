"""Neural Cleanse's input filter: reject inputs that light up the neurons the reversed trigger drives.

The top ``top_fraction`` (paper: 1%) neurons of the second-to-last layer, ranked by how much more the
reversed trigger activates them than clean images do, are watched. An input's score is their mean
activation; the threshold is the ``1 − fpr`` quantile of clean scores, so about ``fpr`` of clean
inputs are rejected.

Example::

    filt = InputFilter(model, fpr=0.05).fit(clean_images, [reversed_trigger])
    labels, rejected = filt.predict(incoming_images)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trojanscan.data.triggers import Trigger, stamp_each
from trojanscan.defenses.base import InputGuard
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import load_npz_record, module_sha256, save_npz_record
from trojanscan.models.taps import Layer, activations, find_layer, rank_neurons
from trojanscan.train import predict as predict_labels
from trojanscan.validation import check_fraction

FILE_FORMAT_VERSION = 1
MIN_CLEAN_IMAGES = 20


@dataclass(frozen=True)
class InputFilterOptions:
    """The input filter's settings (the constructor's keywords; see :class:`InputFilter`)."""

    layer: str | None = None
    top_fraction: float = 0.01
    fpr: float = 0.05


class InputFilter(InputGuard):
    """Flags inputs whose watched-neuron activation exceeds a threshold set on clean data.

    Args:
        model: the (suspect) classifier, images in [0, 1] → logits.
        layer: ``None`` for the second-to-last layer, or the name of a module.
        top_fraction: share of the layer's neurons to watch (at least one).
        fpr: false positive rate on clean inputs that sets the threshold.
    """

    name = "input-filter"
    title = "Neural Cleanse input filter"
    options_type = InputFilterOptions

    def __init__(self, model: nn.Module, layer: str | None = None, top_fraction: float = 0.01,
                 fpr: float = 0.05):
        check_fraction("top_fraction", top_fraction)
        check_fraction("fpr", fpr)
        self.model = model
        self.layer: Layer = find_layer(model, layer)  # refined by fit(), which sees images
        self._layer_name = layer
        self.top_fraction = float(top_fraction)
        self.fpr = float(fpr)

    def options(self) -> InputFilterOptions:
        return InputFilterOptions(self._layer_name, self.top_fraction, self.fpr)

    def fit(self, clean: torch.Tensor, triggers: list[Trigger]) -> InputFilter:  # type: ignore[override]
        """Choose the neurons with ``triggers`` stamped on ``clean`` images, then the threshold."""
        if len(clean) < MIN_CLEAN_IMAGES:
            raise TrojanscanError(f"the filter needs at least {MIN_CLEAN_IMAGES} clean images, got "
                                  f"{len(clean)}")
        self.layer = find_layer(self.model, self._layer_name, probe=clean)
        act_clean = activations(self.model, self.layer, clean)
        act_stamped = activations(self.model, self.layer, stamp_each(clean, triggers))
        order, gap = rank_neurons(act_clean, act_stamped)
        k = max(1, round(self.top_fraction * act_clean.shape[1]))
        self.neurons_ = order[:k].clone()
        self.gaps_ = gap[self.neurons_].clone()
        self.clean_scores_ = act_clean[:, self.neurons_].mean(1)
        self.threshold_ = float(torch.quantile(self.clean_scores_.double(), 1 - self.fpr))
        self.units_ = int(act_clean.shape[1])
        return self

    def _require_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise TrojanscanError("this filter is not fitted; call fit(clean, triggers) or "
                                  "InputFilter.load(path, model) first")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean activation of the watched neurons for each input (high means trigger-like)."""
        self._require_fitted()
        return activations(self.model, self.layer, x)[:, self.neurons_].mean(1)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """True where an input is rejected as carrying a trigger."""
        return self.score(x) > self.threshold_

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels and the filter's reject flags."""
        return predict_labels(self.model, x), self.detect(x)

    def summary(self) -> dict[str, object]:
        self._require_fitted()
        return {"layer": self.layer.label, "neurons": [int(i) for i in self.neurons_],
                "units": self.units_, "top_fraction": self.top_fraction, "fpr": self.fpr,
                "threshold": self.threshold_}

    def save(self, path: str | os.PathLike) -> None:
        """Save as a plain-array ``.npz`` (no pickles), atomically."""
        self._require_fitted()
        save_npz_record(path, {"format_version": np.int64(FILE_FORMAT_VERSION), "layer": self.layer.name,
                               "side": self.layer.side, "neurons": self.neurons_.numpy(),
                               "threshold": np.float64(self.threshold_), "fpr": np.float64(self.fpr),
                               "top_fraction": np.float64(self.top_fraction),
                               "units": np.int64(self.units_), "model_sha256": module_sha256(self.model)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> InputFilter:
        """Read a filter saved by :meth:`save` for the same ``model``; never unpickles."""
        path = Path(path)
        f = load_npz_record(path, "input-filter", _FIELDS, max_member_bytes=_MAX_MEMBER_BYTES,
                            fix="; rebuild it")
        try:
            neurons_arr = f["neurons"]
            if neurons_arr.ndim != 1 or neurons_arr.dtype.kind not in "iu" or len(neurons_arr) == 0:
                raise ValueError("neurons must be a non-empty 1-D integer array")
            version = int(f["format_version"])
            name, side = str(f["layer"]), str(f["side"])
            neurons = torch.from_numpy(neurons_arr.astype(np.int64))
            threshold, fpr = float(f["threshold"]), float(f["fpr"])
            top, units, sha = float(f["top_fraction"]), int(f["units"]), str(f["model_sha256"])
        except Exception as e:  # wrong dtypes or shapes in a damaged file
            raise TrojanscanError(f"{path}: not an input-filter file ({type(e).__name__}: {e})") from None
        if version != FILE_FORMAT_VERSION:
            raise TrojanscanError(f"{path}: filter format {version} is not supported; rebuild it")
        if sha != module_sha256(model):
            raise TrojanscanError(f"{path}: built for a different model (weights differ); rebuild the "
                                  "filter for this model")
        modules = dict(model.named_modules())
        if side not in ("input", "output") or name not in modules or not math.isfinite(threshold):
            raise TrojanscanError(f"{path}: layer or threshold not valid for this model; the file is "
                                  "damaged, rebuild it")
        width = _layer_width(Layer(name, modules[name], side))
        if int(neurons.min()) < 0 or int(neurons.max()) >= units or width not in (None, units):
            raise TrojanscanError(f"{path}: neuron indices do not fit the layer; the file is damaged")
        filt = cls(model, None, top_fraction=top, fpr=fpr)
        filt.layer = Layer(name, modules[name], side)
        filt._layer_name = None if side == "input" else name
        filt.neurons_, filt.threshold_, filt.units_ = neurons, threshold, units
        return filt


_FIELDS = ("format_version", "layer", "side", "neurons", "threshold", "fpr", "top_fraction", "units",
           "model_sha256")
_MAX_MEMBER_BYTES = 1 << 20


def _layer_width(layer: Layer) -> int | None:
    """Neurons of a dense/conv layer as its weights say (None when the module does not tell)."""
    m = layer.module
    if layer.side == "input" and isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    return None
