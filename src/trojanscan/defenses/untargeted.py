"""A universal *untargeted* trigger and the label map it induces: evidence for all-to-all backdoors.

An all-to-all backdoor (``i → i+1``) has no target: Neural Cleanse's per-label search finds no small
trigger for any one label, and K-Arm's pre-screen of label pairs looks where clean images already
lean, which an injected pair need not be. But the injected trigger is one small stamp that moves
*every* class — each to its own label. So we search, with Neural Cleanse's engine and λ schedule, for
the smallest mask and pattern that move a share ``success`` of clean images off their own label, to
any other (loss ``-log(1 - p_y)``), from ``starts`` random starts, and read the map each induces on
the clean images: a source is *mapped* to a label when at least
:data:`MAPPED` of its images move and at least :data:`MAPPED` of those land on that one label.

On a clean model a small universal perturbation sends images to one or two hub labels or scatters
them; on an all-to-all model it reproduces the injected map, many sources to as many different
labels (the verdict's rule reads ``spread``, the number of distinct mapped labels).

Fixed on the development zoos (world zoos of seeds 100-300 and a development all-to-all zoo, seed 700;
README "All-to-all backdoors"): ``success`` is 0.7, not Neural Cleanse's 0.99, because an untargeted
stamp cannot move the images an injected trigger fails on, and the development all-to-all models
reach 59-98% attack success. One start can settle on a natural hub trigger (from their smallest
start a depthwise-separable and an MLP all-to-all model mapped to 4 and 2 labels); of ``starts`` = 4
we keep the start whose map spreads widest, which mapped every development all-to-all model to 5-10
labels and the 48 clean ones to at most 4 of 10 (12 of 43). The four starts run as one batched pass.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from trojanscan.defenses.base import ModelInspector
from trojanscan.defenses.neural_cleanse import SCHEDULES, get_schedule
from trojanscan.defenses.trigger_search import search_untargeted_triggers
from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating
from trojanscan.validation import check_choice, check_clean_data, check_fraction

MAPPED = 0.5  # a source is mapped when this share of its images moves, and this share of those to one label


@dataclass(frozen=True)
class UntargetedOptions:
    """The untargeted search's settings (the constructor's keywords)."""

    schedule: str = "default"  # the trigger-search schedule, as Neural Cleanse's
    steps: int | None = None
    success: float = 0.7  # share of clean images the trigger must move off their label
    starts: int = 4  # random starts searched together; the one whose map spreads widest is kept
    seed: int = 0


@dataclass
class SourceShift:
    """Where the untargeted trigger sends one source label's clean images."""

    source: int
    target: int  # the most common new label
    moved: float  # share of the source's images that changed label
    share: float  # share of the moved images that went to ``target``

    @property
    def mapped(self) -> bool:
        return self.moved >= MAPPED and self.share >= MAPPED


@dataclass
class StartResult:
    """One start's trigger: its size, the share of clean images it moves, and its map's spread."""

    l1_norm: float
    success_rate: float
    converged: bool
    spread: int


@dataclass
class UntargetedEvidence:
    """The kept universal untargeted trigger (the most spreading of the starts that reached the
    success rate), the label map it induces, and every start's outcome."""

    l1_norm: float
    success_rate: float  # share of the clean images it moves
    converged: bool  # it reached the success rate
    shifts: list[SourceShift]
    num_classes: int
    seconds: float
    image_passes: int
    options: dict[str, Any] = field(default_factory=dict)
    starts: list[StartResult] = field(default_factory=list)
    method: str = "untargeted"

    def mapped_pairs(self) -> list[tuple[int, int]]:
        """(source, label) for every mapped source."""
        return [(s.source, s.target) for s in self.shifts if s.mapped]

    @property
    def spread(self) -> int:
        """How many different labels the mapped sources go to."""
        return len({t for _, t in self.mapped_pairs()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UntargetedEvidence:
        keep = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k in keep}
        return cls(**{**d, "shifts": [SourceShift(**s) for s in d["shifts"]],
                      "starts": [StartResult(**s) for s in d.get("starts", [])]})


def label_shifts(before: torch.Tensor, after: torch.Tensor, num_classes: int) -> list[SourceShift]:
    """Each source label's share of moved images and their most common new label (labels ``before``
    are the true ones, ``after`` the stamped images' predictions)."""
    out = []
    for c in range(num_classes):
        own = before == c
        if not own.any():
            continue
        new = after[own & (after != c)].tolist()
        if not new:
            out.append(SourceShift(c, c, 0.0, 0.0))
            continue
        target, count = Counter(new).most_common(1)[0]
        out.append(SourceShift(c, int(target), len(new) / int(own.sum()), count / len(new)))
    return out


class UntargetedSearch(ModelInspector):
    """The smallest universal untargeted trigger and the label map it induces on clean images.

    Example::

        evidence = UntargetedSearch().inspect(model, x_clean, y_clean, num_classes=10)
        print(evidence.l1_norm, evidence.spread, evidence.mapped_pairs())
    """

    name = "untargeted"
    title = "universal untargeted trigger"
    options_type = UntargetedOptions
    needs_data = True

    def __init__(self, schedule: str = "default", steps: int | None = None, success: float = 0.7,
                 starts: int = 4, seed: int = 0) -> None:
        check_choice("schedule", schedule, SCHEDULES)
        if isinstance(starts, bool) or not isinstance(starts, int) or starts < 1:
            raise TrojanscanError(f"starts must be a positive integer, got {starts!r}")
        self.success = check_fraction("success", success, high_inclusive=True)
        self.schedule, self.steps, self.starts, self.seed = schedule, steps, starts, seed

    def inspect(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                num_classes: int, input_shape: tuple[int, ...] | None = None) -> UntargetedEvidence:
        """Search the trigger on clean images ``x`` with true labels ``y`` and read its label map."""
        if x is None or y is None:
            raise TrojanscanError("the untargeted search needs clean images and their labels")
        check_clean_data(x, y, num_classes)
        start = time.perf_counter()
        schedule = get_schedule(self.schedule, steps=self.steps, asr_threshold=self.success)
        found = search_untargeted_triggers(model, x, y, schedule, starts=self.starts, seed=self.seed)
        y = y.long()
        maps = []
        with evaluating(model), torch.no_grad():
            for r in found:
                stamped = (1 - r.mask) * x + r.mask * r.pattern
                after = torch.cat([model(stamped[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
                shifts = label_shifts(y, after, num_classes)
                maps.append((StartResult(r.l1_norm, float((after != y).float().mean()), r.converged,
                                         len({s.target for s in shifts if s.mapped})), shifts))
        # the injected map shows from any start that finds the injected stamp; the others find hubs
        pool = [m for m in maps if m[0].converged] or maps
        kept, shifts = max(pool, key=lambda m: (m[0].spread, -m[0].l1_norm))
        return UntargetedEvidence(kept.l1_norm, kept.success_rate, kept.converged, shifts, num_classes,
                                  time.perf_counter() - start, sum(r.image_passes for r in found),
                                  asdict(self.options()), [m[0] for m in maps])
