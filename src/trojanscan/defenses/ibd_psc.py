"""IBD-PSC (Hou et al., ICML 2024): flag inputs whose label survives amplified batch-norm layers.

Multiplying the affine parameters (γ and β) of a network's last batch-norm layers by ω = 1.5, with
their running statistics left as they are, throws the layers after them off their learnt scale: a
benign input's prediction soon falls apart, while an input carrying a trigger keeps the target
label, because the backdoor is a strong, simple feature that outlasts the distortion. The paper's
parameter-oriented scaling consistency (PSC) of an input is the mean, over n amplified copies of the
model, of the probability each gives the label the unchanged model predicts.

How the copies are made (as the paper): the batch-norm layers are taken from the last one backwards;
on benign calibration inputs the smallest number k of last layers whose amplification changes more
than ``selection_error`` (ξ = 0.6) of the labels is found, and copy i (i = 0 … n−1) amplifies the last
k + 1 + i layers (all of them once that is more than there are). Where we differ: the error in the
selection is against the unchanged model's labels (the calibration images come without labels);
the score is the same mean probability computed from log-odds (:class:`LabelKeepingGuard`: it
orders inputs as the PSC does without ties at p = 1), and the threshold is not the paper's fixed
T = 0.9 but the conformal quantile of benign scores for the requested FRR, like every guard here. If
even amplifying every layer changes no more than ξ of the labels, all copies amplify every layer
(one module, run once per input) and a warning says the signal may be weak. Copies that amplify
the same layers are always run once.

It needs batch-norm layers (the GTSRB CNN, residual and depthwise-separable nets have them; the
paper's MNIST CNN and an MLP do not): a model without any is a one-line error.

Example::

    guard = IbdPsc(model).fit(clean_images)
    labels, trojaned = guard.predict(incoming_images)
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trojanscan.defenses.consistency import MIN_CALIBRATION_SAMPLES, LabelKeepingGuard, model_device
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.models.inference import frozen_for_inference
from trojanscan.validation import check_fraction, check_images

DEFAULT_COPIES = 5
DEFAULT_AMPLIFICATION = 1.5
DEFAULT_SELECTION_ERROR = 0.6
SELECTION_SAMPLES = 500  # benign inputs the layer count is chosen on (the paper used 100)
MAX_COPIES = 32


@dataclass(frozen=True)
class IbdPscOptions:
    """IBD-PSC's settings (the constructor's keywords; see :class:`IbdPsc`)."""

    copies: int = DEFAULT_COPIES
    amplification: float = DEFAULT_AMPLIFICATION
    selection_error: float = DEFAULT_SELECTION_ERROR
    frr: float = 0.01
    batch_size: int = 256
    seed: int = 0
    accelerate: bool = True


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's batch-norm layers with affine parameters, in the order the module lists them
    (a TorchScript model's too, by their original class name)."""
    found = []
    for m in model.modules():
        scripted = str(getattr(m, "original_name", "")) if isinstance(m, torch.jit.ScriptModule) else ""
        is_norm = isinstance(m, nn.modules.batchnorm._BatchNorm) or scripted.startswith("BatchNorm")
        if is_norm and isinstance(getattr(m, "weight", None), torch.Tensor) \
                and isinstance(getattr(m, "bias", None), torch.Tensor):
            found.append(m)
    return found


def amplified(model: nn.Module, last: int, factor: float) -> nn.Module:
    """A copy of ``model`` in eval mode whose last ``last`` batch-norm layers have γ and β × ``factor``."""
    twin = copy.deepcopy(model).eval()
    layers = norm_layers(twin)
    with torch.no_grad():
        for layer in layers[len(layers) - last:]:
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)
    return twin


def _check_options(copies: object, amplification: object, selection_error: object) -> None:
    if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= MAX_COPIES:
        raise TrojanscanError(f"copies must be an integer from 1 to {MAX_COPIES}, got {copies!r}")
    if isinstance(amplification, bool) or not isinstance(amplification, (int, float)) \
            or not math.isfinite(amplification) or amplification <= 1:
        raise TrojanscanError(f"amplification must be a number above 1 (the paper's is 1.5), "
                              f"got {amplification!r}")
    check_fraction("selection_error", selection_error)


class IbdPsc(LabelKeepingGuard):
    """Run-time trojaned-input detector by parameter-oriented scaling consistency.

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits; it must have
            batch-norm layers.
        copies: n, the amplified copies of the model (one forward pass each).
        amplification: ω, the factor on the amplified layers' γ and β.
        selection_error: ξ, the share of benign labels the first copy's layer count must change.
        frr: target false rejection rate of benign inputs, which sets the threshold.
        batch_size: about how many images go to the model in one call.
        seed: kept for the common guard interface (IBD-PSC draws nothing at random).
        accelerate: on CPU, classify through frozen oneDNN copies where that is safe.
    """

    name = "ibd-psc"
    title = "IBD-PSC"
    what = "an IBD-PSC calibration"
    options_type = IbdPscOptions
    _option_fields = ("copies", "amplification", "selection_error")

    def __init__(self, model: nn.Module, copies: int = DEFAULT_COPIES,
                 amplification: float = DEFAULT_AMPLIFICATION,
                 selection_error: float = DEFAULT_SELECTION_ERROR,
                 frr: float = 0.01, batch_size: int = 256, seed: int = 0, accelerate: bool = True) -> None:
        super().__init__(model, frr=frr, batch_size=batch_size, seed=seed, accelerate=accelerate)
        _check_options(copies, amplification, selection_error)
        self.n_layers = len(norm_layers(model))
        if not self.n_layers:
            raise TrojanscanError("IBD-PSC amplifies batch-norm layers and this model has none; guard it "
                                  "with STRIP or TeCo instead")
        self.copies, self.amplification = int(copies), float(amplification)
        self.selection_error = float(selection_error)
        self._twins: dict[int, nn.Module] | None = None

    @property
    def n_views(self) -> int:
        return self.copies

    def views(self, x: torch.Tensor, which: range) -> torch.Tensor:
        """The inputs themselves, once per view: IBD-PSC changes the model, not the input."""
        return x.unsqueeze(1).expand(-1, len(which), *x.shape[1:])

    def amplified_layers(self, j: int) -> int:
        """How many of the last batch-norm layers copy ``j`` amplifies."""
        return min(self.n_layers, self.first_layers_ + 1 + j)

    def _select_layers(self, x: torch.Tensor) -> None:
        """The smallest count k of last layers whose amplification changes more than ξ of the
        labels of benign ``x`` (``first_layers_``; every count's error in ``selection_errors_``)."""
        x = x[:SELECTION_SAMPLES]
        base = self.labels(x)
        errors: list[float] = []
        for k in range(1, self.n_layers + 1):
            twin = amplified(self.model, k, self.amplification)
            with torch.no_grad():
                pred = torch.cat([twin(xb).argmax(1).cpu() for _, xb in self._chunks(x, 1)])
            errors.append(float((pred != base).double().mean()))
            if errors[-1] > self.selection_error:
                break
        else:
            warnings.warn(f"amplifying all {self.n_layers} batch-norm layers ×{self.amplification:g} "
                          f"changes only {errors[-1]:.0%} of benign labels (ξ = {self.selection_error:g}); "
                          "every copy amplifies all of them and IBD-PSC's signal may be weak",
                          TrojanscanWarning, stacklevel=3)
        self.first_layers_ = len(errors) if errors[-1] > self.selection_error else self.n_layers - 1
        self.selection_errors_ = errors
        self._twins = None

    def fit(self, x: torch.Tensor) -> IbdPsc:  # type: ignore[override]
        """Choose the amplified layers on benign images ``x``, then calibrate the threshold on them
        (see :meth:`ConsistencyGuard.fit`)."""
        check_images(x, "benign calibration images")
        if len(x) >= MIN_CALIBRATION_SAMPLES:  # fewer: the engine's one-line error
            self._check_model_runs(x[:2])
            self._select_layers(x)
        super().fit(x)
        return self

    def _twin_modules(self, probe: torch.Tensor) -> dict[int, nn.Module]:
        """The amplified copies by their number of amplified layers (built once, frozen for oneDNN
        where that is safe; copies that amplify the same layers are one module)."""
        if self._twins is None:
            device = model_device(self.model)
            twins = {}
            for last in sorted({self.amplified_layers(j) for j in range(self.copies)}):
                twin = amplified(self.model, last, self.amplification).to(device)
                fast = frozen_for_inference(twin, probe[:8]) if self.accelerate and len(probe) >= 2 else None
                twins[last] = fast if fast is not None else twin
            self._twins = twins
        return self._twins

    def _view_logits(self, classify: nn.Module, x: torch.Tensor, which: range) -> torch.Tensor:
        twins = self._twin_modules(x)
        layers = [self.amplified_layers(j) for j in which]
        with torch.no_grad():
            logits = {last: twins[last](x).float() for last in set(layers)}  # each distinct copy once
        return torch.stack([logits[last] for last in layers], 1)

    def _extra_record(self) -> dict[str, Any]:
        return {"first_layers": np.int64(self.first_layers_),
                "selection_errors": np.asarray(self.selection_errors_, dtype=np.float64)}

    def _read_extra(self, fields: dict[str, np.ndarray], path: Path) -> None:
        try:
            first = int(np.asarray(fields["first_layers"]).item())
            errors = np.asarray(fields["selection_errors"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise TrojanscanError(f"{path}: not {self.what} file (first_layers or selection_errors missing "
                                  "or damaged); recalibrate") from None
        if not 0 <= first <= self.n_layers or errors.ndim != 1:
            raise TrojanscanError(f"{path}: it amplifies from {first} of {self.n_layers} batch-norm layers; "
                                  "the file is damaged or for another model, recalibrate")
        self.first_layers_, self.selection_errors_, self._twins = first, errors.tolist(), None
