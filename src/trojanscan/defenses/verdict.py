"""One decision from several pieces of evidence: ``clean``, ``suspicious`` or ``backdoored``, with the
target label(s), the kind of backdoor and a score whose meaning is stated.

Evidence (each optional but the first):

- **trigger size** (Neural Cleanse's per-label search): the smallest reversed trigger over the median
  label's (the size ratio). Its p-value is the chance that a clean model with as many labels has a
  ratio this small: ``log(ratio)`` divided by the expected smallest of ``K`` standard normals is
  taken as normal, fitted to the clean models of the 'world' development zoos
  (:data:`CLEAN_LOG_RATIO`: four architecture families, 10 and 43 labels, natural shortcuts).
  A *dense* net (no convolution: an MLP) is held to its own null (rule 6, :data:`DENSE_NULL`): its
  labels' trigger sizes are far more even than a convolutional net's, so the ratio null of the
  convolutional nets' natural shortcuts hid its backdoors; and their spread depends on the data (the
  smallest clean GTSRB ratio is much smaller than an MNIST one), so the statistic is the smallest
  label's robust anomaly on the log scale — ``(log L1_min − median) / (1.4826 · MAD)`` over the
  model's own labels, divided by the expected smallest of K standard normals — held to a normal of
  mean ``DENSE_NULL[0]`` and deviation ``DENSE_NULL[1] / √K`` (the MAD of K labels is noisier for
  small K).
  A *depthwise-separable* net (a convolution with one group per input channel: MobileNets) holds its
  ratio to its own null (rule 8, :data:`DEPTHWISE_NULL`): its natural shortcuts are smaller than
  other convolutional nets'. Other convolutional nets are held to the null of their head (rule 9,
  :mod:`~trojanscan.models.head`): one that reads globally pooled features (a ResNet) to
  :data:`POOLED_NULL`, one that reads a flattened map with positions (the paper's nets) to
  :data:`POSITIONAL_NULL`; a head that cannot be told keeps :data:`CLEAN_LOG_RATIO`.
- **maximum margin** (MM-BD, data-free): its order-statistic p-value; its largest-margin class is
  its target. Catches large and blended triggers that have no small mask.
- **label pairs** (source-specific search with the symmetry test): a source's easiest pair is
  *injected* when its trigger is small against the model's typical pair (``PAIR_SIZE`` × the median
  forward norm), its reverse is ``PAIR_SYMMETRY`` times larger, and the model does not already send
  the source's clean images to the target (``PAIR_PRIOR``). ``ALL_TO_ALL_PAIRS`` injected pairs
  to as many different targets make an all-to-all backdoor; fewer make the model suspicious.
- **universal perturbation** (:mod:`~trojanscan.defenses.perturbation`; only when ``decide`` is given
  it: rule 7, measured and not adopted, see below): each label's smallest targeted universal additive
  perturbation (L2); the smallest over the median label's, held to a null of the same form as the size
  ratio's (:data:`PERTURBATION_NULL`). A blend or a large pattern has no small mask but is one short
  direction to the target.
- **untargeted trigger map** (:mod:`~trojanscan.defenses.untargeted`): one small universal stamp that
  moves clean images off their own labels; when its mapped sources reach ``ALL_TO_ALL_SPREAD`` of the
  labels, all different, and the stamp is smaller than every label's Neural Cleanse trigger, the
  model has an all-to-all backdoor (rule 5; K-Arm's pre-screen of pairs misses most of its pairs).

The score is Fisher's combination of the p-values (size, margin and, from rule 7, perturbation): the
chance that a clean model shows evidence this strong, as far as the fitted null holds and the pieces
are independent. The decision follows the score: ``backdoored`` below ``ALPHA``, ``suspicious`` below
``SUSPICIOUS``, otherwise ``clean`` — except that an all-to-all pattern of injected pairs or of the
untargeted trigger's map is ``backdoored`` whatever the score. The targets are the labels whose own
combined evidence (its size p-value, with MM-BD's when it is MM-BD's class and its perturbation
p-value) is below ``ALPHA`` — two or more
make a multi-target backdoor — or else the label with the strongest.

Rule 4 and its thresholds were fixed on development data only: the world zoos of seeds 100, 200 and
300 (MNIST, Fashion-MNIST and GTSRB, 78 models whose attack took). On them Fisher's combination
ranked models better than the Bonferroni minimum of rule 3 (AUROC 0.980 against 0.964 without the
all-to-all model) and, at 0.01, flagged 31 of 38 trojaned models and none of 40 clean ones; 5 clean
models scored 0.013-0.046 (natural shortcuts: Fashion-MNIST's "bag" on residual and depthwise nets,
MNIST and GTSRB depthwise nets), hence ``SUSPICIOUS`` 0.05. Measured once on the held-out seed-400
world zoo (46 models): 11/22 trojaned and 1/24 clean flagged, AUROC 0.82 — the false-positive rate
held, the detection rate did not (README, ``benchmarks/results/verdict_rule4_*.json``).

Rule 6 (the dense nets' null) was fixed on the development zoos and a development zoo of 96 MLPs
(seed 910): rule 5 flagged 36 of 42 trojaned MLPs with 10 labels and 10 of 18 with 43, because the
convolutional nets' natural shortcuts set its ratio null; the dense null flags 41 and 15, and 1 of the
61 clean MLPs (in-sample). On the 190 development models: flagged 75 → 85 of 94, clean flagged 0 → 1
of 96 (``benchmarks/results/verdict_rule6_vs_rule5_dev.json``); convolutional nets are unchanged.

Rule 7 (rule 6 with the universal perturbation's p-value in Fisher's combination and in each label's
evidence) was written down with its adoption test before its development results were seen: adopt if,
on the world zoos of seeds 1100 and 1200 (95 models whose attack took), more trojaned models are
flagged, at most one more clean one, and the score's AUROC does not drop. It flagged 36 of 47 instead
of 35, the same 3 of 48 clean models, AUROC 0.891 instead of 0.896, and called 6 clean models
suspicious instead of 3: not adopted. The perturbation ratio mostly repeats the trigger size (alone,
AUROC 0.79 against the size ratio's 0.88) and has natural shortcuts of its own (GTSRB depthwise nets'
labels 12 and 13, MNIST's 8); the stripe blends that rule 6 misses need pushes of 0.47-0.56 of the
median, ordinary for a clean model (README "A universal perturbation for blends").

Rule 8 (the depthwise nets' null) came from the held-out zoos of seeds 1100-1300, where all 6 false
positives of rule 6 were clean MobileNets (6 of 18; 3 of 18 on seeds 400-600, 0 of 10 on the development
zoos). Its null was fitted to the 46 clean depthwise nets of every zoo scanned until then, and it was
adopted on those zoos (a test written beforehand: fewer clean models flagged, at most 3 fewer trojaned
ones, no lower AUROC): 332 models, clean flagged 10 -> 4, trojaned flagged 184 -> 181, AUROC 0.904 -> 0.908
(seeds 400-600) and 0.898 -> 0.900 (1100-1300) — in-sample for the depthwise nets; the seed-1400 zoo,
built and never opened before, measures it (README). The remaining depthwise false positives come from
MM-BD on MNIST MobileNets, which this rule does not touch.

Rule 9 (the head's null) came from the 683 models of every zoo measured before the seed-1600 zoo
(seeds 100-800, 910, 920, 1100-1500): the clean size-ratio statistic depends on whether the head pools
(ResNets -0.505 ± 0.164, MobileNets -0.660 ± 0.210) or keeps positions (the MNIST and GTSRB CNNs
-0.266 ± 0.083, the same for 10 and 43 labels: -0.262, -0.274), so the pooled CLEAN_LOG_RATIO
(-0.421) let the positional nets' backdoors pass as shortcuts: rule 8 flagged 8 of 20 GTSRB CNN
backdoors, whose target had the smallest trigger in all 20. In-sample, on those models: trojaned
flagged 268 -> 288 of 335, clean flagged 6 -> 6 of 348. Held out (seed 1600, 48 models): 21 of 24
flagged against rule 8's 20, 0 of 24 clean both. On two architectures no null was fitted to (seed 1700):
10 of 12 against 9, but 1 of 12 clean flagged against 0 — a clean resnet-flat (positional head) sits
between the two nulls, so one family's null is too tight for another (README).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from trojanscan.defenses.mmbd import MarginEvidence
from trojanscan.defenses.pairs import PAIR_PRIOR, SMALL_PAIR, PairEvidence
from trojanscan.defenses.perturbation import PerturbationEvidence
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.defenses.untargeted import UntargetedEvidence

# 5: rule 4 and the untargeted trigger's map; 6: dense nets' own size null; 7: the rule and the universal
# perturbation, when decide() is given one (measured, not adopted: module notes); 8: depthwise nets' own
# size-ratio null; 9: the head's own size-ratio null (pooled or positional; the default)
RULE_VERSION = 9
PERTURBATION_RULE = 7
ALPHA = 0.01  # the score below which a model is backdoored (the module notes say why)
SUSPICIOUS = 0.05  # the score below which it is suspicious
# log(size ratio) / |expected smallest of K standard normals| of the 40 clean models of the world
# development zoos (seeds 100, 200 and 300; 30 with 10 labels, 10 GTSRB with 43): mean and standard
# deviation of the fitted normal. The smallest of K labels is more extreme the more labels there
# are: unscaled, the 10-label mean is -0.62 and the 43-label -1.03 (K-scaling predicts -0.89).
CLEAN_LOG_RATIO = (-0.421, 0.202)
# Dense nets: the smallest label's log-scale robust anomaly over the expected smallest of K normals,
# of the 61 clean MLPs of the development zoos (seeds 100, 200, 300, 700, GTSRB 100 and the MLP zoo
# of seed 910; 42 with 10 labels, 19 with 43): mean -1.133 (10 labels -1.125, 43 labels -1.153), and
# sd·√K pooled 1.506 (10 labels: sd 0.495, 43: 0.213).
DENSE_NULL = (-1.133, 1.506)
# The universal perturbation ratio's null, of the same form as CLEAN_LOG_RATIO: the 48 clean models of the
# world zoos of seeds 1100 and 1200 (four families, 10 and 43 labels; mean -0.273 with 10 labels, -0.451
# with 43; dense nets -0.176, convolutional -0.384: one null, as planned, since the two differ by less than
# one deviation).
PERTURBATION_NULL = (-0.332, 0.219)
# Depthwise-separable nets (MobileNets): log(size ratio) / expected smallest of K normals of the 46 clean
# depthwise nets of every world zoo scanned before the seed-1400 zoo (seeds 100-300 and 700, 400-600,
# 1100-1300); their natural shortcuts (Fashion-MNIST's bag, GTSRB's priority road) sit lower than other
# convolutional nets' (mean -0.645 against CLEAN_LOG_RATIO's -0.421).
DEPTHWISE_NULL = (-0.645, 0.196)
# Rule 9: the same statistic of the clean convolutional nets of every zoo measured before seed 1600 (seeds
# 100-800, 1100-1500), by head: 63 ResNets (globally pooled features; 10 labels -0.462, 43 labels -0.605)
# and 64 CNNs whose dense head reads a flattened map (10 labels -0.262, 43 labels -0.274).
POOLED_NULL = (-0.505, 0.164)
POSITIONAL_NULL = (-0.266, 0.083)
ROBUST_SD = 1.4826  # MAD → standard deviation of a normal
PAIR_SIZE = SMALL_PAIR  # the pair search reverses only pairs this small
PAIR_SYMMETRY = 10.0  # K-Arm's bound; at 2.5 every clean Fashion-MNIST development model had injected pairs
ALL_TO_ALL_PAIRS = 3  # injected pairs (to as many different targets) that make an all-to-all backdoor
# the share of the labels that the untargeted trigger's mapped sources must reach, all different, for an
# all-to-all verdict (at least ALL_TO_ALL_PAIRS); the module notes say where it was set
ALL_TO_ALL_SPREAD = 0.5
VERDICTS = ("clean", "suspicious", "backdoored")
# the size null was fitted on 10- and 43-label models; with 2 labels two ordinary triggers 2.5x apart
# would read p 0.004, and with 1 the expected smallest normal is 0
MIN_SIZE_LABELS = 5
SCORE_MEANING = ("combined p-value (Fisher's method over the evidence with a p-value): the chance that a "
                 "clean model shows evidence this strong")


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
        d["score_meaning"] = SCORE_MEANING
        d["thresholds"] = {"backdoored": ALPHA, "suspicious": SUSPICIOUS}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        items = [EvidenceItem(**{k: (math.nan if v is None and k in ("value", "threshold", "p_value")
                                     else v) for k, v in e.items()}) for e in d["evidence"]]
        return cls(d["verdict"], list(d["targets"]), d.get("kind"), float(d["score"]), items,
                   [tuple(p) for p in d.get("injected_pairs", [])], int(d.get("rule_version", 0)))


def smallest_normal(labels: int) -> float:
    """The expected smallest of ``labels`` standard normal draws (Blom's approximation), negated."""
    return -statistics.NormalDist().inv_cdf(0.625 / (labels + 0.25))


def size_ratio_p_value(ratio: float, labels: int = 10,
                       null: tuple[float, float] = CLEAN_LOG_RATIO) -> float:
    """The chance that a clean model with ``labels`` labels has a size ratio at most ``ratio``; NaN
    (no evidence) below :data:`MIN_SIZE_LABELS` labels, where the fitted null says nothing. ``null``:
    mean and deviation of log(ratio) over the expected smallest of K normals (the perturbation
    ratio's is :data:`PERTURBATION_NULL`)."""
    if labels < MIN_SIZE_LABELS:
        return math.nan
    if not ratio > 0:
        return 0.0 if ratio == 0 else math.nan
    mean, sd = null
    return statistics.NormalDist(mean, sd).cdf(math.log(ratio) / smallest_normal(labels))


def combined_p_value(p_values: list[float]) -> float:
    """Fisher's combination of independent p-values: the chance under the null of evidence this strong."""
    x = -sum(math.log(max(p, 1e-300)) for p in p_values)  # half Fisher's statistic (chi-square, 2m dof)
    return min(1.0, math.exp(-x) * sum(x**i / math.factorial(i) for i in range(len(p_values))))


def dense_anomalies(norms: dict[int, float]) -> dict[int, float]:
    """Each label's log-scale robust anomaly over the expected smallest of K normals (NaN where the
    spread is zero or a norm is not positive): the dense-net size statistic."""
    if len(norms) < MIN_SIZE_LABELS or min(norms.values()) <= 0:
        return {k: math.nan for k in norms}
    logs = {k: math.log(v) for k, v in norms.items()}
    median = statistics.median(logs.values())
    spread = ROBUST_SD * statistics.median(abs(v - median) for v in logs.values())
    scale = spread * smallest_normal(len(norms))
    return {k: ((v - median) / scale if scale > 0 else math.nan) for k, v in logs.items()}


def _dense_null(labels: int) -> statistics.NormalDist:
    mean, spread = DENSE_NULL
    return statistics.NormalDist(mean, spread / math.sqrt(labels))


def dense_p_value(anomaly: float, labels: int) -> float:
    """The chance that a clean dense net with ``labels`` labels has a smallest anomaly this low."""
    if not math.isfinite(anomaly) or labels < MIN_SIZE_LABELS:
        return math.nan
    return _dense_null(labels).cdf(anomaly)


def ratio_null(depthwise: bool = False, pooled: bool | None = None) -> tuple[str, tuple[float, float]]:
    """The family a convolutional net's size ratio is held to, and its null: a depthwise net's (rule 8),
    else its head's (rule 9: ``pooled`` True/False), else the pooled convolutional one."""
    if depthwise:
        return "depthwise net", DEPTHWISE_NULL
    if pooled is None:
        return "", CLEAN_LOG_RATIO
    return ("pooled head", POOLED_NULL) if pooled else ("positional head", POSITIONAL_NULL)


def _label_p_values(scan: ScanResult, dense: bool = False,
                    null: tuple[float, float] = CLEAN_LOG_RATIO) -> dict[int, float]:
    """Each label's size p-value (each held to the null of the smallest, a conservative test): the
    size ratio's against ``null``, or for a dense net its robust anomaly's."""
    norms = {r.label: r.l1_norm for r in scan.labels}
    if dense:
        return {k: dense_p_value(t, len(norms)) for k, t in dense_anomalies(norms).items()}
    median = statistics.median(norms.values())
    return {k: (size_ratio_p_value(v / median, len(norms), null) if median > 0 else math.nan)
            for k, v in norms.items()}


def p_value_says(p: float) -> str:
    """What a p-value says against the verdict's thresholds: "backdoor", "suspicious" or "clean"."""
    return "backdoor" if p < ALPHA else "suspicious" if p < SUSPICIOUS else "clean"


def _size_evidence(scan: ScanResult, label_p: dict[int, float], dense: bool = False,
                   family: tuple[str, tuple[float, float]] = ("", CLEAN_LOG_RATIO)) -> EvidenceItem:
    norms = {r.label: r.l1_norm for r in scan.labels}
    median = statistics.median(norms.values())
    smallest = min(norms, key=norms.get)
    p = label_p[smallest]
    says = p_value_says(p)
    targets = sorted(k for k, q in label_p.items() if q < ALPHA) if says == "backdoor" else (
        [smallest] if says == "suspicious" else [])
    detail = (f"smallest reversed trigger L1 {norms[smallest]:.1f} (label {smallest}) against the "
              f"median {median:.1f}, {norms[smallest] / scan.labels[0].mask.numel():.1%} of the image")
    if dense:
        anomaly = dense_anomalies(norms)[smallest]
        return EvidenceItem("trigger size (dense net)", anomaly, _dense_at(ALPHA, len(norms)), says, targets,
                            p, detail + "; held to the dense nets' null (log-scale robust anomaly)")
    kind, null = family
    return EvidenceItem(f"trigger size ratio ({kind})" if kind else "trigger size ratio",
                        norms[smallest] / median if median > 0 else math.nan,
                        _ratio_at(ALPHA, len(norms), null), says, targets, p,
                        detail + (f"; held to the {kind}s' null" if kind else ""))


def _dense_at(p: float, labels: int) -> float:
    """The dense-net anomaly whose p-value is ``p``."""
    return _dense_null(labels).inv_cdf(p) if labels >= MIN_SIZE_LABELS else math.nan


def _ratio_at(p: float, labels: int, null: tuple[float, float] = CLEAN_LOG_RATIO) -> float:
    """The ratio whose p-value is ``p`` (the threshold the ratio is held to)."""
    if labels < MIN_SIZE_LABELS:
        return math.nan
    mean, sd = null
    return math.exp(statistics.NormalDist(mean, sd).inv_cdf(p) * smallest_normal(labels))


def _margin_evidence(mmbd: MarginEvidence) -> EvidenceItem:
    top = margin_top(mmbd)
    p = mmbd.p_value
    says = p_value_says(p)
    return EvidenceItem("maximum margin (MM-BD)", p, ALPHA, says, [top] if says != "clean" else [], p,
                        f"largest margin {mmbd.statistics[top]:.1f} at label {top}")


def perturbation_label_p(perturbation: PerturbationEvidence) -> dict[int, float]:
    """Each label's perturbation p-value (its norm over the median, held to the null of the smallest)."""
    median = statistics.median(perturbation.norms)
    k = len(perturbation.norms)
    if not (math.isfinite(median) and median > 0):
        return {}
    return {label: size_ratio_p_value(v / median, k, PERTURBATION_NULL) if math.isfinite(v) else 1.0
            for label, v in enumerate(perturbation.norms)}


def _perturbation_evidence(perturbation: PerturbationEvidence, label_p: dict[int, float]) -> EvidenceItem:
    k, smallest = len(perturbation.norms), perturbation.smallest
    p = label_p.get(smallest, math.nan)
    says = p_value_says(p) if math.isfinite(p) else "clean"
    targets = sorted(t for t, q in label_p.items() if q < ALPHA) if says == "backdoor" else (
        [smallest] if says == "suspicious" else [])
    median = statistics.median(perturbation.norms)
    detail = (f"smallest universal push to label {smallest}: L2 {perturbation.norms[smallest]:.2f} against "
              f"the median {median:.2f}" if math.isfinite(median) else "most labels were never reached")
    return EvidenceItem("universal perturbation ratio", perturbation.ratio,
                        _ratio_at(ALPHA, k, PERTURBATION_NULL), says, targets, p, detail)


def margin_top(mmbd: MarginEvidence) -> int:
    """MM-BD's largest-margin class."""
    return max(range(len(mmbd.statistics)), key=lambda k: mmbd.statistics[k])


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


def spread_needed(labels: int) -> int:
    """How many different labels an untargeted trigger's map must reach to read as all-to-all."""
    return max(ALL_TO_ALL_PAIRS, math.ceil(ALL_TO_ALL_SPREAD * labels))


def _untargeted_evidence(untargeted: UntargetedEvidence, scan: ScanResult) -> EvidenceItem:
    mapped = untargeted.mapped_pairs()
    needed = spread_needed(untargeted.num_classes)
    smallest = min(r.l1_norm for r in scan.labels)
    says = "backdoor" if untargeted.spread >= needed and untargeted.l1_norm < smallest else "clean"
    return EvidenceItem("untargeted trigger map", untargeted.spread, needed, says,
                        sorted({t for _, t in mapped}) if says == "backdoor" else [],
                        detail=f"a {untargeted.l1_norm:.1f}-px universal trigger (the smallest per-label "
                               f"trigger: {smallest:.1f}) moves {untargeted.success_rate:.0%} of the clean "
                               f"images; mapped sources {mapped or 'none'} reach {untargeted.spread} "
                               "different labels")


def decide(scan: ScanResult, mmbd: MarginEvidence | None = None,
           pairs: PairEvidence | None = None, untargeted: UntargetedEvidence | None = None, *,
           dense: bool = False, perturbation: PerturbationEvidence | None = None,
           depthwise: bool = False, pooled: bool | None = None) -> Verdict:
    """Combine the evidence into one :class:`Verdict` (see the module notes for the rule); ``dense``:
    the model has no convolution (its trigger sizes are held to the dense nets' null); ``depthwise``:
    it has depthwise convolutions (held to the depthwise nets' size-ratio null, rule 8); ``pooled``:
    its head reads globally pooled features (True) or a map with positions (False; rule 9), ``None``
    when unknown (:func:`~trojanscan.models.head.pools_globally` tells)."""
    family = ratio_null(depthwise, pooled)
    size_p = _label_p_values(scan, dense, family[1])
    items = [_size_evidence(scan, size_p, dense, family)]
    label_p = {k: [p] for k, p in size_p.items()}
    if mmbd is not None:
        items.append(_margin_evidence(mmbd))
        label_p.setdefault(margin_top(mmbd), []).append(mmbd.p_value)
    if perturbation is not None:
        push_p = perturbation_label_p(perturbation)
        items.append(_perturbation_evidence(perturbation, push_p))
        for k, p in push_p.items():
            label_p.setdefault(k, []).append(p)
    pair_says = untargeted_says = "clean"
    pair_targets: list[int] = []
    if pairs is not None:
        items.append(_pair_evidence(pairs))
        pair_says, pair_targets = items[-1].says, items[-1].targets
    if untargeted is not None:
        items.append(_untargeted_evidence(untargeted, scan))
        untargeted_says = items[-1].says
    p_values = [e.p_value for e in items if math.isfinite(e.p_value)]
    score = combined_p_value(p_values) if p_values else math.nan
    per_label = {k: combined_p_value([p for p in ps if math.isfinite(p)]) for k, ps in label_p.items()
                 if any(math.isfinite(p) for p in ps)}
    found = injected_pairs(pairs) if pairs is not None else []
    all_to_all = "backdoor" in (pair_says, untargeted_says)
    verdict = ("backdoored" if score < ALPHA or all_to_all else
               "suspicious" if score < SUSPICIOUS or pair_says == "suspicious" else "clean")
    strongest = [min(per_label, key=per_label.get)] if per_label else []
    if all_to_all:
        if untargeted_says == "backdoor":
            found = sorted(set(found) | set(untargeted.mapped_pairs()))  # type: ignore[union-attr]
        kind, targets = "all-to-all", sorted({t for _, t in found})
    elif verdict == "backdoored":  # each label on its own evidence; else the label with the strongest
        targets = sorted(k for k, p in per_label.items() if p < ALPHA) or strongest
        kind = "multi-target" if len(targets) > 1 else "all-to-one"
    elif verdict == "suspicious":
        from_pairs = pair_targets if pair_says == "suspicious" else []
        targets = sorted(set(from_pairs) | (set(strongest) if score < SUSPICIOUS else set()))
        kind = "source-specific" if from_pairs and score >= SUSPICIOUS else None
    else:
        kind, targets = None, []
    return Verdict(verdict, targets, kind, score, items, found,
                   PERTURBATION_RULE if perturbation is not None else RULE_VERSION)
