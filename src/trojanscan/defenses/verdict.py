"""One decision from several pieces of evidence: ``clean``, ``suspicious`` or ``backdoored``, with the
target label(s), the kind of backdoor and a score whose meaning is stated.

Evidence (each optional but the first):

- **trigger size** (Neural Cleanse's per-label search): the smallest reversed trigger over the median
  label's (the size ratio). Labels below ``SIZE_RATIO_BACKDOOR`` are targets (two or more: a
  multi-target backdoor). Its p-value is empirical: the share of clean reference models (the
  development zoos, :data:`CLEAN_SIZE_RATIOS`) with a ratio at most this one.
- **maximum margin** (MM-BD, data-free): its order-statistic p-value; below ``MMBD_ALPHA`` its
  largest-margin class is a target. Catches large and blended triggers that have no small mask.
- **label pairs** (source-specific search with the symmetry test): a source's easiest pair is
  *injected* when its trigger is small against the model's typical pair (``PAIR_SIZE`` × the median
  forward norm) and its reverse is ``PAIR_SYMMETRY`` times larger. ``ALL_TO_ALL_PAIRS`` injected pairs
  to as many different targets make an all-to-all backdoor; fewer make the model suspicious.

The score is ``min(1, m · min p)`` over the ``m`` pieces with a p-value (Bonferroni): an upper bound
on the chance that a clean model shows evidence this strong, as far as the references go.

PROVISIONAL: the thresholds below were set on development data only (the classic MNIST/Fashion-MNIST
zoo, seed 0, for the size ratio; the paper's 0.05 for MM-BD; digits models and the first 11 models of
a 'world' development zoo, seed 100, for the pairs); the held-out measurement is in the README when it
exists.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from trojanscan.defenses.mmbd import MarginEvidence
from trojanscan.defenses.pairs import PairEvidence
from trojanscan.defenses.scan_result import ScanResult

RULE_VERSION = 1
SIZE_RATIO_BACKDOOR = 0.4
SIZE_RATIO_SUSPICIOUS = 0.5
MMBD_ALPHA = 0.05
MMBD_SUSPICIOUS = MMBD_ALPHA  # no band: clean development models had p 0.07-0.86
PAIR_SIZE = 0.75
PAIR_SYMMETRY = 10.0  # K-Arm's bound; at 2.5 every clean Fashion-MNIST development model had injected pairs
ALL_TO_ALL_PAIRS = 3  # injected pairs (to as many different targets) that make an all-to-all backdoor
# Size ratios of the 12 clean models × 3 seeds of the classic development zoo (seed 0,
# benchmarks/results/zoo/results.json): the reference for the size ratio's empirical p-value.
CLEAN_SIZE_RATIOS = (0.457, 0.464, 0.477, 0.49, 0.491, 0.509, 0.514, 0.525, 0.532, 0.552, 0.557, 0.572,
                     0.592, 0.603, 0.629, 0.651, 0.68, 0.692, 0.7, 0.71, 0.721, 0.724, 0.731, 0.738,
                     0.748, 0.753, 0.757, 0.765, 0.774, 0.781, 0.782, 0.833, 0.855, 0.861, 0.894, 0.906)
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
    """Share of the clean reference models whose size ratio is at most ``ratio`` (conservative +1)."""
    below = sum(r <= ratio for r in CLEAN_SIZE_RATIOS)
    return (1 + below) / (1 + len(CLEAN_SIZE_RATIOS))


def _size_evidence(scan: ScanResult) -> EvidenceItem:
    norms = {r.label: r.l1_norm for r in scan.labels}
    median = statistics.median(norms.values())
    ratio = min(norms.values()) / median if median > 0 else math.nan
    targets = sorted(k for k, v in norms.items() if median > 0 and v / median < SIZE_RATIO_BACKDOOR)
    says = ("backdoor" if ratio < SIZE_RATIO_BACKDOOR else
            "suspicious" if ratio < SIZE_RATIO_SUSPICIOUS else "clean")
    if says == "suspicious":
        targets = [min(norms, key=norms.get)]
    return EvidenceItem("trigger size ratio", ratio, SIZE_RATIO_BACKDOOR, says, targets,
                        size_ratio_p_value(ratio),
                        f"smallest reversed trigger L1 {min(norms.values()):.1f} against the median "
                        f"{median:.1f}, {min(norms.values()) / scan.labels[0].mask.numel():.1%} of the image")


def _margin_evidence(mmbd: MarginEvidence) -> EvidenceItem:
    top = max(range(len(mmbd.statistics)), key=lambda k: mmbd.statistics[k])
    says = ("backdoor" if mmbd.p_value < MMBD_ALPHA else
            "suspicious" if mmbd.p_value < MMBD_SUSPICIOUS else "clean")
    targets = (mmbd.flagged_labels or [top]) if says != "clean" else []
    return EvidenceItem("maximum margin (MM-BD)", mmbd.p_value, MMBD_ALPHA, says, targets, mmbd.p_value,
                        f"largest margin {mmbd.statistics[top]:.1f} at label {top}")


def injected_pairs(pairs: PairEvidence) -> list[tuple[int, int]]:
    """Each source's easiest pair when it is small against the model's typical pair and asymmetric."""
    forward = [p.l1_norm for p in pairs.pairs if math.isfinite(p.l1_norm)]
    if not forward:
        return []
    typical = statistics.median(forward)
    return sorted((p.source, p.target) for p in pairs.best_per_source().values()
                  if p.l1_norm <= PAIR_SIZE * typical and math.isfinite(p.reverse_l1)
                  and p.ratio >= PAIR_SYMMETRY)


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
    items = [_size_evidence(scan)]
    if mmbd is not None:
        items.append(_margin_evidence(mmbd))
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
