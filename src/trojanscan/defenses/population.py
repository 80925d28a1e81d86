"""Population-referenced trigger size: a label's reversed trigger against the same label on other models
of the same data.

A natural shortcut (Fashion-MNIST's "bag", GTSRB's priority-road and stop signs, the strokes of an
MNIST "8") is easy to reach on every model trained on that data, whatever its architecture; an
injected target is easy only on the model that carries it. When several models of one dataset are
audited together, each label's size is therefore held to the same label on the *other* models
(their median, so a trojaned neighbour with another target does not move it; no model is assumed
clean):

    excess_k = log(L1_k / median L1) − median over the other models of the same quantity

The smallest excess, scaled like the size ratio by the expected smallest of K standard normals, is
held to a normal fitted to the clean models of the development zoos (:data:`POPULATION_NULL`), and
its p-value combined with MM-BD's by Fisher's method when that is known. The targets are every label
whose own excess, held to the same null, is below the verdict's ``ALPHA`` (two or more: a
multi-target model), else the smallest.

Fixed on the development zoos (world zoos of seeds 100–400, 124 models, 64 clean) before the seed-500
zoo was looked at; the figures are in ``benchmarks/verdict_zoo.py`` and the README.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trojanscan.defenses.verdict import ALPHA, combined_p_value, smallest_normal

# mean and standard deviation of (smallest excess / expected smallest of K normals) over the 64 clean
# models of the development zoos (each against the other models of its zoo and dataset)
POPULATION_NULL = (-0.348, 0.168)
POPULATION_MIN = 3  # other models of the same data (and label count) needed for a reference


@dataclass
class PopulationEvidence:
    """One model's population-referenced size evidence."""

    target: int  # the label with the smallest excess
    targets: list[int]  # every label whose own excess has a p-value below ALPHA (else the target)
    excess: float  # its log-size excess over the other models' median
    p_value: float  # the chance that a clean model shows an excess this small
    score: float  # the p-value combined with MM-BD's (Fisher), or the p-value alone
    models: int  # the other models it was held to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_ratios(l1_norms: Sequence[float]) -> list[float]:
    """Each label's log(reversed trigger L1 / the median label's L1), in label order."""
    median = statistics.median(l1_norms)
    return [math.log(v / median) if v > 0 and median > 0 else -math.inf for v in l1_norms]


def _p_value(excess: float, labels: int) -> float:
    """The chance that a clean model's smallest excess is this small (each label is held to the null of
    the smallest: conservative for the others)."""
    z = excess / smallest_normal(labels)
    return statistics.NormalDist(*POPULATION_NULL).cdf(z) if math.isfinite(z) else 0.0


def population_evidence(profiles: Mapping[str, Sequence[float]],
                        margin_p: Mapping[str, float] | None = None) -> dict[str, PopulationEvidence]:
    """The evidence of every model in ``profiles`` (name → :func:`log_ratios`, all of one dataset)
    that has at least :data:`POPULATION_MIN` others with as many labels; ``margin_p`` (name → MM-BD's
    p-value) joins the score where known."""
    found: dict[str, PopulationEvidence] = {}
    margin_p = margin_p or {}
    for name, own in profiles.items():
        others = [p for other, p in profiles.items() if other != name and len(p) == len(own)]
        if len(others) < POPULATION_MIN or len(own) < 2:
            continue
        excess = [v - statistics.median(o[k] for o in others) for k, v in enumerate(own)]
        label_p = [_p_value(e, len(excess)) for e in excess]
        target = min(range(len(excess)), key=excess.__getitem__)
        targets = [k for k, q in enumerate(label_p) if q < ALPHA] or [target]
        ps = [label_p[target]] + [q for q in (margin_p.get(name),) if q is not None and math.isfinite(q)]
        found[name] = PopulationEvidence(target, targets, excess[target], label_p[target],
                                         combined_p_value(ps), len(others))
    return found
