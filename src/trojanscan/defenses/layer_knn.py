"""Layer k-NN: flag inputs whose activations, layer by layer, lie far from every benign input the model
gives the same label.

A trigger that the network has learnt to map to the target label still has to pass through the early
and middle layers, where it looks like nothing a benign image of the target class produces: a blended
pattern, a sinusoidal signal or scattered pixels add activations that benign images of that class
never show, even though the last layers agree on the label. So for each input the distance from its
activations to the nearest benign calibration input **of the label the model gives it** is measured
at the output of every ``nn.Conv2d`` and ``nn.Linear``, each distance is put on a common scale by
the benign calibration distances (log(1 + d / median), then centred and divided by the standard
deviation), and the suspicion score is their sum. A dense layer is read as its units; a convolution
twice, as its channel means (what a blend or a sinusoid shifts) and as its channel maxima (what a
small patch lights up in one place), each with its own distance.

Where it comes from: the k-nearest-neighbour distance is the out-of-distribution score of Sun et al.
(ICML 2022); comparing an input with benign inputs of its own predicted class at many layers is the
idea of TED (Mo et al., IEEE S&P 2024, which ranks neighbours instead of measuring distances) and
Beatrix (Ma et al., NDSS 2023, class-conditional Gram-matrix statistics). TED's rank statistic was
tried first on our development models and failed at FRR 1% (a benign tail of large ranks); the
distance is what worked. Calibration needs benign images only; their labels are the model's own.
Benign calibration scores are leave-one-out (each image's nearest neighbour among the others).

The references are the calibration images' activations, kept in the calibration file (plain arrays;
about n × the layers' total width floats). A label no other calibration image carries is measured
against the farthest calibration image (so such inputs are flagged more often) and a warning says so
at calibration. The activations of Python layers are read by hooks; those of a TorchScript model
(which takes no hooks) by running a copy of its graph that also returns them
(:mod:`trojanscan.models.script_taps`).
Calibrate on images the model was not trained on: its training images sit closer to each other than
fresh ones do, which raises the false rejections on fresh images (README, "A second guard").

Example::

    guard = LayerKnn(model).fit(clean_images)
    labels, trojaned = guard.predict(incoming_images)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trojanscan.defenses.consistency import CalibratedGuard, model_device
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.models.modes import evaluating
from trojanscan.models.script_taps import TappedScript, scripted_parts, swapped_in
from trojanscan.models.taps import Layer, per_neuron, tapping

DEFAULT_NEIGHBOURS = 1
MAX_NEIGHBOURS = 50
MAX_SUFFIX = ":max"  # a convolution's channel maxima, read as a layer of their own


@dataclass(frozen=True)
class LayerKnnOptions:
    """Layer k-NN's settings (the constructor's keywords; see :class:`LayerKnn`)."""

    neighbours: int = DEFAULT_NEIGHBOURS
    frr: float = 0.01
    batch_size: int = 256
    seed: int = 0
    accelerate: bool = True


def kth_distance(queries: torch.Tensor, query_labels: torch.Tensor, references: torch.Tensor,
                 reference_labels: torch.Tensor, k: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's distance to its k-th nearest reference of the same label (Euclidean).

    ``skip``: for each query, the index of a reference to leave out (itself), or −1. With fewer than
    k such references the farthest of them counts; with none, the farthest reference of any label.
    """
    # in float64: the matrix-product shortcut of cdist loses small distances in float32
    d = torch.cdist(queries.double(), references.double())
    if skip is not None:
        rows = torch.nonzero(skip >= 0).flatten()
        d[rows, skip[rows]] = torch.inf
    same = torch.where(query_labels[:, None] == reference_labels[None, :], d, torch.inf)
    near = same.topk(min(k, same.shape[1]), dim=1, largest=False).values
    finite = torch.isfinite(near)
    kth = torch.where(finite, near, -torch.inf).max(1).values
    farthest = torch.where(torch.isfinite(d), d, -torch.inf).max(1).values
    return torch.where(finite.any(1), kth, farthest)


def mean_and_max(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's output summarised per input: a dense layer's units; a convolution's channel means
    (what a blend or a sinusoid shifts) and, under ``":max"``, its channel maxima (what a small patch
    lights up in one place)."""
    if t.dim() != 4:
        return {"": per_neuron(t)}
    maps = t.flatten(2)
    return {"": maps.mean(2), MAX_SUFFIX: maps.amax(2)}


class LayerKnn(CalibratedGuard):
    """Run-time trojaned-input detector by class-conditional nearest-neighbour distances at every layer.

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits, with
            convolutional or dense layers (Python or TorchScript).
        neighbours: k, the neighbour whose distance counts (1: the nearest).
        frr: target false rejection rate of benign inputs, which sets the threshold.
        batch_size: about how many images go to the model in one call.
        seed: kept for the common guard interface (nothing is drawn at random).
        accelerate: kept for the common guard interface (the hooks need the model itself).
    """

    name = "layer-knn"
    title = "layer k-NN"
    what = "a layer k-NN calibration"
    options_type = LayerKnnOptions
    _option_fields = ("neighbours",)

    def __init__(self, model: nn.Module, neighbours: int = DEFAULT_NEIGHBOURS, frr: float = 0.01,
                 batch_size: int = 256, seed: int = 0, accelerate: bool = True) -> None:
        super().__init__(model, frr=frr, batch_size=batch_size, seed=seed, accelerate=accelerate)
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) \
                or not 1 <= neighbours <= MAX_NEIGHBOURS:
            raise TrojanscanError(f"neighbours must be an integer from 1 to {MAX_NEIGHBOURS}, "
                                  f"got {neighbours!r}")
        self._scripts = {path: TappedScript(m, path) for path, m in scripted_parts(model).items()}
        if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) \
                and not any(t.names for t in self._scripts.values()):
            raise TrojanscanError("layer k-NN reads the outputs of the model's Conv2d and Linear layers and "
                                  "this model has none; guard it with STRIP and TeCo instead")
        self.neighbours = int(neighbours)
        self._layers: list[Layer] | None = None

    @property
    def accelerated(self) -> bool:
        """Always False: the activations are read from the model itself, not a frozen copy."""
        return False

    # -- activations ------------------------------------------------------------------------------

    def activations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per layer an N×U float32 tensor of the images' activations, and the model's labels."""
        assert self._layers is not None, "layers are chosen at fit or load"
        sinks: dict[str, list[torch.Tensor]] = {}
        labels = [self._run(xb, sinks).argmax(1).cpu() for _, xb in self._chunks(x, 1)]
        if not labels:
            return [torch.empty(0, r.shape[1]) for r in self.references_], torch.empty(0, dtype=torch.long)
        return [torch.cat(sinks[name]).cpu().float() for name in self.layer_names_], torch.cat(labels)

    def _run(self, xb: torch.Tensor, sinks: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """The model's logits for ``xb``, its layers' per-neuron activations appended to ``sinks``
        (hooks on Python layers, :class:`TappedScript` stand-ins for TorchScript parts)."""
        assert self._layers is not None
        for tapped in self._scripts.values():
            tapped.sinks, tapped.summary = sinks, mean_and_max
        try:
            with evaluating(self.model), torch.no_grad(), tapping(self._layers, sinks, mean_and_max), \
                    swapped_in(self.model, self._scripts) as run:
                return run(xb)
        finally:
            for tapped in self._scripts.values():
                tapped.sinks = None

    def _standardised(self, distances: torch.Tensor) -> torch.Tensor:
        """m×L distances → m×L scores on each layer's benign scale."""
        return (torch.log1p(distances / self.median_) - self.centre_) / self.scale_

    def _distances(self, feats: list[torch.Tensor], labels: torch.Tensor,
                   leave_one_out: bool = False) -> torch.Tensor:
        """m×L distances to the k-th nearest reference of the same label, layer by layer."""
        out = []
        for j, ref in enumerate(self.references_):
            cols = []
            for i in range(0, len(labels), self.batch_size):
                rows = torch.arange(i, min(i + self.batch_size, len(labels)))
                cols.append(kth_distance(feats[j][rows], labels[rows], ref, self.reference_labels_,
                                         self.neighbours, rows if leave_one_out else None))
            out.append(torch.cat(cols) if cols else torch.empty(0, dtype=torch.float64))
        return torch.stack(out, 1)

    # -- calibration and scores -------------------------------------------------------------------

    def _fit_scores(self, x: torch.Tensor) -> torch.Tensor:
        self._layers = [Layer(n, m, "output") for n, m in self.model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))]
        sinks: dict[str, list[torch.Tensor]] = {}
        probe = x[:2].to(model_device(self.model), torch.float32)
        classes = int(self._run(probe, sinks).shape[1])
        # in call order; a layer read twice per pass would interleave its rows: left out
        self.layer_names_ = [name for name, parts in sinks.items() if len(parts) == 1]
        if not self.layer_names_:
            raise TrojanscanError("no Conv2d or Linear layer runs once per forward pass; layer k-NN "
                                  "cannot read this model")
        read = {n.removesuffix(MAX_SUFFIX) for n in self.layer_names_}
        self._layers = [layer for layer in self._layers if layer.name in read]
        self.references_, self.reference_labels_ = self.activations(x)
        self._warn_missing_labels(classes)
        d = self._distances(self.references_, self.reference_labels_, leave_one_out=True)
        self.median_ = d.median(0).values.clamp_min(1e-12)
        logs = torch.log1p(d / self.median_)
        self.centre_, self.scale_ = logs.mean(0), logs.std(0).clamp_min(1e-6)
        return self._standardised(d).sum(1)

    def _warn_missing_labels(self, classes: int) -> None:
        counts = torch.bincount(self.reference_labels_, minlength=classes)
        few = int((counts < self.neighbours + 1).sum())
        if few:
            warnings.warn(f"{few} of {classes} labels have fewer than {self.neighbours + 1} calibration "
                          "images the model gives them; inputs with those labels are judged against few "
                          "or no neighbours and flagged more often: calibrate on more images",
                          TrojanscanWarning, stacklevel=4)

    def _input_scores(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        feats, own = self.activations(x)
        return self._standardised(self._distances(feats, own)).sum(1)

    def layer_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each input's standardised distance at every layer (m×L; the score is the row sum), to see
        which layers set an input apart."""
        self._check_inputs(x)
        feats, own = self.activations(x)
        return self._standardised(self._distances(feats, own))

    # -- files ------------------------------------------------------------------------------------

    def _extra_record(self) -> dict[str, Any]:
        return {"layers": np.asarray(self.layer_names_), "reference_labels": self.reference_labels_.numpy(),
                "median": self.median_.numpy(), "centre": self.centre_.numpy(), "scale": self.scale_.numpy(),
                **{f"reference.{j}": r.numpy() for j, r in enumerate(self.references_)}}

    def _read_extra(self, fields: dict[str, np.ndarray], path: Path) -> None:
        damaged = f"{path}: its layer k-NN references are missing or damaged; recalibrate"
        try:
            names = [str(n) for n in np.asarray(fields["layers"]).ravel()]
            labels = torch.from_numpy(np.asarray(fields["reference_labels"]).astype(np.int64))
            stats = [torch.from_numpy(np.asarray(fields[k], dtype=np.float64)) for k in ("median", "centre",
                                                                                        "scale")]
            refs = [torch.from_numpy(np.asarray(fields[f"reference.{j}"], dtype=np.float32))
                    for j in range(len(names))]
        except (KeyError, TypeError, ValueError):
            raise TrojanscanError(damaged) from None
        if labels.ndim != 1 or any(s.shape != (len(names),) or not torch.isfinite(s).all() for s in stats) \
                or any(r.ndim != 2 or len(r) != len(labels) or not torch.isfinite(r).all() for r in refs) \
                or (labels < 0).any():
            raise TrojanscanError(damaged)
        modules = dict(self.model.named_modules())
        read = {n for t in self._scripts.values() for n in t.names}
        bases = list(dict.fromkeys(n.removesuffix(MAX_SUFFIX) for n in names))
        missing = [n for n in bases
                   if n not in read and not isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
        if missing:
            raise TrojanscanError(f"{path}: calibrated on layers this model lacks "
                                  f"({', '.join(missing[:3])}); recalibrate on this model")
        self._layers = [Layer(n, modules[n], "output") for n in bases if n not in read]
        self.layer_names_, self.reference_labels_, self.references_ = names, labels, refs
        self.median_, self.centre_, self.scale_ = stats
