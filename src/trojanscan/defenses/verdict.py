"""One decision from several pieces of evidence: ``clean``, ``suspicious`` or ``backdoored``, with the
target label(s), the kind of backdoor and a score whose meaning is stated.

Evidence (each optional but the first):

- **trigger size** (Neural Cleanse's per-label search): the smallest reversed trigger over the median
  label's (the size ratio). Its p-value is the chance that a clean model has a ratio this small,
  from a log-normal fitted to the clean models of the 'world' development zoos
  (:data:`CLEAN_LOG_RATIO`): models of four architecture families, some with natural shortcuts.
- **maximum margin** (MM-BD, data-free): its order-statistic p-value; its largest-margin class is
  the target. Catches large and blended triggers that have no small mask.
- **label pairs** (source-specific search with the symmetry test): a source's easiest pair is
  *injected* when its trigger is small against the model's typical pair (``PAIR_SIZE`` × the median
  forward norm), its reverse is ``PAIR_SYMMETRY`` times larger, and the model does not already send
  the source's clean images to the target (``PAIR_PRIOR``). ``ALL_TO_ALL_PAIRS`` injected pairs
  to as many different targets make an all-to-all backdoor; fewer make the model suspicious.

The score is ``min(1, m · min p)`` over the ``m`` pieces with a p-value (Bonferroni): an upper bound
on the chance that a clean model shows evidence this strong, as far as the fitted null holds. The
decision follows the score: ``backdoored`` below ``ALPHA``, ``suspicious`` below ``SUSPICIOUS``,
otherwise ``clean`` — except that an all-to-all pattern of injected pairs is ``backdoored`` whatever
the score. The targets are the labels whose own evidence is below ``ALPHA``: each label's size
ratio is tested like the smallest (two or more: a multi-target backdoor), and MM-BD's class.

Rule 2 and its thresholds were fixed on development data only: the world zoos of seeds 100 and 200
(28 MNIST/Fashion-MNIST models) and a GTSRB world zoo of seed 100 (4 models); the reasons are beside
each constant, and its held-out measurement (seed 300, 48 models) is in the README. Rule 3 adds one
condition to an injected pair (``PAIR_PRIOR``), set after that measurement: the seed-300 zoo is
development data for it, and it has no held-out figure yet.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from trojanscan.defenses.mmbd import MarginEvidence
from trojanscan.defenses.pairs import SMALL_PAIR, PairEvidence
from trojanscan.defenses.scan_result import ScanResult

RULE_VERSION = 3
ALPHA = 0.05  # the score below which a model is backdoored: a 5% bound on a clean model's chance
SUSPICIOUS = 0.2  # the score below which it is suspicious
# log(size ratio) of the 14 clean models of the world development zoos (seeds 100 and 200): mean and
# standard deviation of the fitted normal. The classic zoo's 36 clean reference-CNN ratios are
# tighter (mean -0.425, sd 0.204) and would call the world's natural shortcuts (ratio 0.28) p 1e-5.
CLEAN_LOG_RATIO = (-0.647, 0.356)
PAIR_SIZE = SMALL_PAIR  # the pair search reverses only pairs this small
PAIR_SYMMETRY = 10.0  # K-Arm's bound; at 2.5 every clean Fashion-MNIST development model had injected pairs
ALL_TO_ALL_PAIRS = 3  # injected pairs (to as many different targets) that make an all-to-all backdoor
# Rule 3: a pair whose source's clean images already go to the target (mean softmax at least this)
# needs no trigger one way, so its asymmetry says nothing. Set after the seed-300 measurement: its
# clean GTSRB ResNet/MobileNet models were called all-to-all from such pairs (0.10-0.60), while every
# injected pair of the MNIST/Fashion-MNIST zoos had at most 0.04.
PAIR_PRIOR = 0.1
VERDICTS = ("clean", "suspicious", "backdoored")


@dataclass
class EvidenceItem:
    """One piece of evidence: its value, the threshold it is held to, what it says and why."""

    name: str
    value: float
    threshold: float
    says: str  # "backdoor", "suspicious" or "clean"
    targets: list[int] = field(default_factory=list)
    p_value: float = math.nan
    detail: str = ""


@dataclass
class Verdict:
    """The decision, its targets and kind, the score and every piece of evidence behind it."""

    verdict: str
    targets: list[int]
    kind: str | None  # "all-to-one", "multi-target", "all-to-all", "source-specific" or None
    score: float
    evidence: list[EvidenceItem]
    injected_pairs: list[tuple[int, int]] = field(default_factory=list)
    rule_version: int = RULE_VERSION

    @property
    def infected(self) -> bool:
        return self.verdict == "backdoored"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["injected_pairs"] = [list(p) for p in self.injected_pairs]
        d["score_meaning"] = ("upper bound on the chance that a clean model shows evidence this strong "
                              "(Bonferroni over the evidence with a p-value)")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        items = [EvidenceItem(**{k: (math.nan if v is None and k in ("value", "threshold", "p_value")
                                     else v) for k, v in e.items()}) for e in d["evidence"]]
        return cls(d["verdict"], list(d["targets"]), d.get("kind"), float(d["score"]), items,
                   [tuple(p) for p in d.get("injected_pairs", [])], int(d.get("rule_version", 0)))


def size_ratio_p_value(ratio: float) -> float:
    """The chance that a clean model's size ratio is at most ``ratio`` (the fitted log-normal)."""
    if not ratio > 0:
        return 0.0 if ratio == 0 else math.nan
    mean, sd = CLEAN_LOG_RATIO
    return statistics.NormalDist(mean, sd).cdf(math.log(ratio))


def _size_evidence(scan: ScanResult, pieces: int) -> EvidenceItem:
    norms = {r.label: r.l1_norm for r in scan.labels}
    median = statistics.median(norms.values())
    ratios = {k: (v / median if median > 0 else math.nan) for k, v in norms.items()}
    ratio = min(ratios.values())
    p = size_ratio_p_value(ratio)
    # a looser bound for a second target once one is certain would have named a natural shortcut
    # (ratio 0.30) of a trojaned development MobileNet as a second target
    targets = sorted(k for k, r in ratios.items() if pieces * size_ratio_p_value(r) < ALPHA)
    says = "backdoor" if targets else "suspicious" if pieces * p < SUSPICIOUS else "clean"
    if says == "suspicious":
        targets = [min(ratios, key=ratios.get)]
    return EvidenceItem("trigger size ratio", ratio, _ratio_at(ALPHA / pieces), says, targets, p,
                        f"smallest reversed trigger L1 {min(norms.values()):.1f} against the median "
                        f"{median:.1f}, {min(norms.values()) / scan.labels[0].mask.numel():.1%} of the image")


def _ratio_at(p: float) -> float:
    """The size ratio whose p-value is ``p`` (the threshold the ratio is held to)."""
    mean, sd = CLEAN_LOG_RATIO
    return math.exp(statistics.NormalDist(mean, sd).inv_cdf(p))


def _margin_evidence(mmbd: MarginEvidence, pieces: int) -> EvidenceItem:
    top = max(range(len(mmbd.statistics)), key=lambda k: mmbd.statistics[k])
    p = mmbd.p_value
    says = "backdoor" if pieces * p < ALPHA else "suspicious" if pieces * p < SUSPICIOUS else "clean"
    targets = [top] if says != "clean" else []
    return EvidenceItem("maximum margin (MM-BD)", p, ALPHA / pieces, says, targets, p,
                        f"largest margin {mmbd.statistics[top]:.1f} at label {top}")


def injected_pairs(pairs: PairEvidence) -> list[tuple[int, int]]:
    """Each source's easiest pair when it is small against the model's typical pair and asymmetric."""
    forward = [p.l1_norm for p in pairs.pairs if math.isfinite(p.l1_norm)]
    if not forward:
        return []
    typical = statistics.median(forward)
    return sorted((p.source, p.target) for p in pairs.best_per_source().values()
                  if p.l1_norm <= PAIR_SIZE * typical and math.isfinite(p.reverse_l1)
                  and p.ratio >= PAIR_SYMMETRY and not p.prescreen_probability >= PAIR_PRIOR)


def _pair_evidence(pairs: PairEvidence) -> EvidenceItem:
    found = injected_pairs(pairs)
    sources = len({p.source for p in pairs.pairs})
    targets = Counter(t for _, t in found)
    all_to_all = len(found) >= ALL_TO_ALL_PAIRS and len(targets) >= ALL_TO_ALL_PAIRS
    says = "backdoor" if all_to_all else "suspicious" if found else "clean"
    return EvidenceItem("label pairs (symmetry)", len(found), ALL_TO_ALL_PAIRS, says, sorted(targets),
                        detail=(f"injected pairs {found} of {sources} sources" if found
                                else f"no injected pair among {sources} sources"))


def decide(scan: ScanResult, mmbd: MarginEvidence | None = None,
           pairs: PairEvidence | None = None) -> Verdict:
    """Combine the evidence into one :class:`Verdict` (see the module notes for the rule)."""
    pieces = 1 + (mmbd is not None)  # the evidence with a p-value
    items = [_size_evidence(scan, pieces)]
    if mmbd is not None:
        items.append(_margin_evidence(mmbd, pieces))
    if pairs is not None:
        items.append(_pair_evidence(pairs))
    says = {e.name: e.says for e in items}
    backdoor = [e for e in items if e.says == "backdoor"]
    verdict = ("backdoored" if backdoor else
               "suspicious" if any(e.says == "suspicious" for e in items) else "clean")
    found = injected_pairs(pairs) if pairs is not None else []
    if says.get("label pairs (symmetry)") == "backdoor":
        kind, targets = "all-to-all", sorted({t for _, t in found})
    elif backdoor:
        targets = sorted({t for e in backdoor for t in e.targets})
        kind = "multi-target" if len(targets) > 1 else "all-to-one"
    elif verdict == "suspicious":
        targets = sorted({t for e in items if e.says == "suspicious" for t in e.targets})
        kind = "source-specific" if found and says.get("label pairs (symmetry)") == "suspicious" else None
    else:
        kind, targets = None, []
    p_values = [e.p_value for e in items if math.isfinite(e.p_value)]
    score = min(1.0, len(p_values) * min(p_values)) if p_values else math.nan
    return Verdict(verdict, targets, kind, score, items, found)
