"""The combined run-time guard: STRIP plus detectors that see other signals, one calibration, one decision.

STRIP catches triggers that survive superimposed images (patches) but not faint whole-image blends;
TeCo catches inputs whose robustness differs across corruptions (blends, and patches a blur wipes
out); layer k-NN inputs whose activations lie far from every benign input of their label (blends,
sinusoids, scattered pixels); SCALE-UP and IBD-PSC, optionally, inputs that keep their label when
the pixels or the batch-norm parameters are amplified. A user should not need to
know which trigger they face, so the guard pools what its members see into one decision, calibrated
as a whole on benign inputs only. Each member turns its statistic into a suspicion score (STRIP:
minus the entropy). Two rules (``rule``):

**pooled** (``rule="pooled"``, :mod:`~trojanscan.defenses.pooling`): each member's score becomes a p-value
against its benign calibration scores, the p-values are pooled (the stronger of Fisher's combination
and the smallest p-value), and an input is rejected when the pooled statistic exceeds the conformal
quantile of the calibration inputs' own. Inputs that several members find somewhat odd are caught
as well as those one member finds very odd. The other members score every input first; STRIP then
copies each input only until the pooled verdict is sure (:func:`~trojanscan.defenses.pooling.score_needed`).
It is not the default: it misses less on the world zoos but more of the whole-image triggers of the
reference bench (README, "A pooled decision for the guard").

**or** (the default): an input is rejected when **any** member flags it, and each member gets the same
share of the benign tail: its threshold is its (k+1)-th largest benign calibration score, so it
flags k of the n calibration inputs. k is the largest count for which the members together flag at
most ⌊frr·(n+1)⌋ − 1 calibration inputs: the OR rule's own conformal quantile, so a fresh benign
input is rejected with probability about ``frr`` overall (not per member). Each member's share lies
between Bonferroni's ``frr/M`` (members that never flag the same benign inputs) and the whole
``frr`` (members that always do); calibrating the rule on the data, not splitting the budget
blindly, keeps whatever the members' agreement leaves. The members' thresholds are these under both
rules (they give each detector's figures "in the guard").

Under the OR rule, screening goes member by member: an input one member flags is not shown to the
next, and STRIP and SCALE-UP stop copying an input as soon as their verdict is sure. STRIP always
screens first: it draws each input's overlays by the input's position in the batch it is shown, so
only when it sees the whole batch are its verdicts those of :meth:`Guard.scores`; the others follow
in the order of ``detectors``.

Example::

    guard = Guard(model).fit(clean_images)          # STRIP + TeCo + layer k-NN at FRR 1%, OR rule
    labels, trojaned = guard.predict(incoming_images)
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trojanscan.defenses.base import InputGuard
from trojanscan.defenses.consistency import (
    CalibratedGuard,
    FieldReader,
    check_same_model,
    tail_count,
    upper_threshold,
)
from trojanscan.defenses.ibd_psc import DEFAULT_AMPLIFICATION, DEFAULT_COPIES, DEFAULT_SELECTION_ERROR, IbdPsc
from trojanscan.defenses.layer_knn import DEFAULT_NEIGHBOURS, LayerKnn
from trojanscan.defenses.pooling import calibration_pooled_scores, pooled_scores, score_needed
from trojanscan.defenses.scale_up import DEFAULT_SCALES, ScaleUp
from trojanscan.defenses.strip import Strip
from trojanscan.defenses.teco import DEFAULT_CORRUPTIONS, TeCo
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import load_npz_record, module_sha256, save_npz_record
from trojanscan.validation import check_choice, check_fraction

MEMBERS: dict[str, type[InputGuard]] = {cls.name: cls for cls in (Strip, TeCo, LayerKnn, ScaleUp, IbdPsc)}
DEFAULT_DETECTORS = ("strip", "teco", "layer-knn")
RULES = ("or", "pooled")  # how the members' evidence makes one decision (module notes)
# A TeCo that catches the stripes blend of guard_bench.py (noises against blur and pixelation at
# severity 4, their spread): every development cell met the goal with it, but on a fresh held-out zoo
# it let far more stamped inputs through than the default (README, "A second guard"), so it is an
# option (``Guard(model, **LOW_PASS_TECO)``), not the default.
LOW_PASS_TECO = {"corruptions": ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur",
                                 "pixelate"), "severity": 4, "deviation": "std"}
FILE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GuardOptions:
    """The combined guard's settings (the constructor's keywords; see :class:`Guard`)."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    frr: float = 0.01
    rule: str = "or"
    n: int = 10
    temperature: float | str = "auto"
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severity: int = 2
    deviation: str = "mahalanobis"
    scales: tuple[float, ...] = DEFAULT_SCALES
    copies: int = DEFAULT_COPIES
    amplification: float = DEFAULT_AMPLIFICATION
    selection_error: float = DEFAULT_SELECTION_ERROR
    neighbours: int = DEFAULT_NEIGHBOURS
    batch_size: int = 256
    seed: int = 0
    accelerate: bool = True


def parse_detectors(detectors: object) -> tuple[str, ...]:
    """One or more distinct member names, as a tuple (a comma-separated string is split)."""
    if isinstance(detectors, str):
        detectors = [d.strip() for d in detectors.split(",") if d.strip()]
    names = tuple(detectors) if isinstance(detectors, (tuple, list)) else ()
    for name in names:
        check_choice("detector", name, MEMBERS)
    if not names or len(set(names)) != len(names):
        raise TrojanscanError(f"detectors must be one or more distinct names of {', '.join(MEMBERS)}, "
                              f"got {detectors!r}")
    return names


def joint_thresholds(benign: dict[str, torch.Tensor], frr: float) -> tuple[dict[str, float], int]:
    """Per-member thresholds for the OR rule at an overall ``frr``, from benign suspicion scores.

    Every member flags its k highest benign scores (threshold: its (k+1)-th largest); k is the
    largest count at which the union of flagged calibration inputs stays within
    ⌊frr·(n+1)⌋ − 1. Returns ``(thresholds, k)``; flag an input when a score exceeds its threshold.
    """
    check_fraction("frr", frr)
    if not benign:
        raise TrojanscanError("the guard needs at least one detector's benign scores")
    scores = {m: torch.as_tensor(s, dtype=torch.float64).flatten() for m, s in benign.items()}
    n = len(next(iter(scores.values())))
    if n < 2 or any(len(s) != n for s in scores.values()):
        raise TrojanscanError(f"every detector needs the same benign inputs (at least 2), got "
                              f"{ {m: len(s) for m, s in scores.items()} }")
    if not all(torch.isfinite(s).all() for s in scores.values()):
        raise TrojanscanError("benign scores contain NaN or infinity; check the model's outputs")
    allowed = tail_count(n, frr)
    if allowed < 0:
        warnings.warn(f"{n} benign inputs are too few for FRR {frr:g}; each detector flags only inputs "
                      "above its largest benign score", TrojanscanWarning, stacklevel=2)
        allowed = 0
    ordered = {m: s.sort(descending=True).values for m, s in scores.items()}

    def union(k: int) -> int:  # calibration inputs flagged when every member flags its k highest
        return int(torch.stack([s > ordered[m][k] for m, s in scores.items()]).any(0).sum())

    best, worst = 0, allowed + 1  # union(best) ≤ allowed < union(worst); union grows with k
    while worst - best > 1:
        mid = (best + worst) // 2
        best, worst = (mid, worst) if union(mid) <= allowed else (best, mid)
    return {m: float(ordered[m][best]) for m in scores}, best


class _Member:
    """A detector seen by the guard: suspicion scores (higher = more likely trojaned), a threshold,
    early-exit flags and a record to embed in the guard's file."""

    def __init__(self, detector: InputGuard) -> None:
        self.detector = detector

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrate alone on benign ``x``; their suspicion scores."""
        return self.detector.fit(x).calibration_scores_

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score(x)

    @property
    def threshold(self) -> float:
        return self.detector.threshold_

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.detector.threshold_ = value

    def detect(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.detector.detect(x, labels)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.labels(x)

    def record(self) -> dict[str, Any]:
        return self.detector.to_record()

    @staticmethod
    def restore(kind: type[CalibratedGuard], fields: dict[str, np.ndarray], path: Path, model: nn.Module,
                **settings: Any) -> InputGuard:
        """The member's detector from its fields in the guard's file at ``path``."""
        return kind.from_record(fields, path, model, **settings)


class _StripMember(_Member):
    """STRIP inside the guard: suspicion = −entropy, its boundary = −threshold."""

    detector: Strip

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # its own boundary is replaced by the joint one
            warnings.simplefilter("ignore", UserWarning)
            self.detector.calibrate(x)
        return -self.detector.calibration_entropies_.double()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return -self.detector.entropy(x).double()

    @property
    def threshold(self) -> float:
        return -self.detector.boundary_

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.detector.boundary_ = -value

    def detect(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.detector.screen(x)[0]

    def record(self) -> dict[str, Any]:  # STRIP writes files only: its own file, read back
        with tempfile.TemporaryDirectory() as tmp:
            self.detector.save(Path(tmp) / "strip.npz")
            return load_npz_record(Path(tmp) / "strip.npz", "STRIP calibration")

    @staticmethod
    def restore(kind: type[Strip], fields: dict[str, np.ndarray], path: Path, model: nn.Module,
                **settings: Any) -> InputGuard:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "strip.npz"
            save_npz_record(part, fields)
            try:
                return kind.load(part, model, **settings)
            except TrojanscanError as e:  # name the user's file, not the temporary one
                problem = str(e).replace(f"{part}: ", "")
                raise TrojanscanError(f"{path}: its STRIP part: {problem}") from None


def _member(detector: InputGuard) -> _Member:
    return _StripMember(detector) if isinstance(detector, Strip) else _Member(detector)


class Guard(InputGuard):
    """STRIP plus TeCo and layer k-NN (optionally SCALE-UP, IBD-PSC) under one calibration and one
    decision.

    Args:
        model: the classifier, taking N×C×H×W images in [0, 1] and returning logits.
        detectors: the members, of :data:`MEMBERS` (STRIP screens first, the others in this order);
            ``None``: :data:`DEFAULT_DETECTORS`, less any this model cannot have (with a warning).
        frr: the overall false rejection rate of benign inputs.
        rule: ``"or"`` (any member flags; see :func:`joint_thresholds`) or ``"pooled"`` (the
            members' p-values pooled into one statistic: misses less, costs more; module notes).
        n: STRIP's perturbed copies per input (10 is the paper's figure for GTSRB).
        temperature: STRIP's softmax temperature, or ``"auto"``.
        corruptions, severity, deviation: TeCo's corruption types, their severity (1–5) and statistic
            (:data:`LOW_PASS_TECO` gives the setting that catches a stripes blend).
        scales: SCALE-UP's amplification factors.
        copies, amplification, selection_error: IBD-PSC's amplified model copies, the factor on their
            batch-norm parameters and the benign error that picks the first copy's layers.
        neighbours: layer k-NN's k (the k-th nearest benign input of the same label counts).
        batch_size: about how many images go to the model in one call.
        seed: seeds STRIP's overlays and TeCo's noise fields.
        accelerate: on CPU, classify through a frozen oneDNN copy of the model where that is safe.
    """

    name = "guard"
    title = "combined guard"
    options_type = GuardOptions

    def __init__(self, model: nn.Module, detectors: tuple[str, ...] | str | None = None,
                 frr: float = 0.01, rule: str = "or", n: int = 10, temperature: float | str = "auto",
                 corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS, severity: int = 2,
                 deviation: str = "mahalanobis", scales: tuple[float, ...] = DEFAULT_SCALES,
                 copies: int = DEFAULT_COPIES, amplification: float = DEFAULT_AMPLIFICATION,
                 selection_error: float = DEFAULT_SELECTION_ERROR, neighbours: int = DEFAULT_NEIGHBOURS,
                 batch_size: int = 256, seed: int = 0, accelerate: bool = True) -> None:
        named = parse_detectors(DEFAULT_DETECTORS if detectors is None else detectors)
        self.frr = check_fraction("frr", frr)
        self.rule = check_choice("rule", rule, RULES)
        common = {"frr": self.frr, "batch_size": batch_size, "seed": seed, "accelerate": accelerate}
        built = {"strip": lambda: Strip(model, n=n, temperature=temperature, boundary="quantile", **common),
                 "teco": lambda: TeCo(model, corruptions=corruptions, severity=severity, deviation=deviation,
                                      **common),
                 "scale-up": lambda: ScaleUp(model, scales=scales, **common),
                 "ibd-psc": lambda: IbdPsc(model, copies=copies, amplification=amplification,
                                           selection_error=selection_error, **common),
                 "layer-knn": lambda: LayerKnn(model, neighbours=neighbours, **common)}
        self.members = {}
        for name in sorted(named, key=lambda d: d != "strip"):  # STRIP first, see the module notes
            try:
                self.members[name] = _member(built[name]())
            except TrojanscanError as e:  # a default member this model cannot have (TorchScript)
                if detectors is not None or name == "strip":
                    raise
                warnings.warn(f"the default guard goes without {MEMBERS[name].title}: {e}", TrojanscanWarning,
                              stacklevel=2)
        self.detectors = tuple(self.members)
        self.model, self.n, self.temperature = model, n, temperature
        self.severity, self.deviation = severity, deviation
        self.corruptions, self.scales = tuple(corruptions), tuple(float(s) for s in scales)
        self.copies, self.amplification = copies, float(amplification)
        self.selection_error, self.neighbours = float(selection_error), neighbours
        self.batch_size, self.seed, self.accelerate = batch_size, int(seed), bool(accelerate)

    # -- calibration ------------------------------------------------------------------------------

    def fit(self, x: torch.Tensor) -> Guard:  # type: ignore[override]
        """Calibrate every member on benign images ``x``, then the decision at ``frr``: the members'
        OR-rule thresholds (:func:`joint_thresholds`) and the pooled rule's threshold. Returns
        ``self`` with ``thresholds_``, ``tail_``, ``tail_allowed_``, ``pooled_threshold_`` (fitted
        under both rules, so either can decide), ``calibration_scores_`` (member → benign suspicion
        scores) and ``n_calibration_`` set."""
        self.calibration_scores_ = {name: m.fit(x) for name, m in self.members.items()}
        self._decide_thresholds()
        self.n_calibration_ = len(x)
        self.model_sha256_ = module_sha256(self.model)
        return self

    def _decide_thresholds(self) -> None:
        self.thresholds_, self.tail_ = joint_thresholds(self.calibration_scores_, self.frr)
        self.tail_allowed_ = max(0, tail_count(len(next(iter(self.calibration_scores_.values()))), self.frr))
        for name, t in self.thresholds_.items():
            self.members[name].threshold = t
        pooled = calibration_pooled_scores(self.calibration_scores_)  # under both rules
        self.pooled_threshold_ = upper_threshold(pooled, self.frr, what="pooled benign statistics")

    def _require_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise TrojanscanError("this guard is not calibrated; call fit(clean_images) or "
                                  "Guard.load(path, model) first")

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guard's rule on members' suspicion scores (as :meth:`scores` gives them): pooled, the
        pooled statistic above its threshold; OR, any member's score above its threshold."""
        self._require_fitted()
        missing = sorted(set(self.detectors) - set(scores))
        if missing:
            raise TrojanscanError(f"scores are missing for detector(s) {', '.join(missing)}")
        if self.rule == "pooled":
            return self.pooled(scores) > self.pooled_threshold_
        return torch.stack([torch.as_tensor(scores[m], dtype=torch.float64) > self.thresholds_[m]
                            for m in self.detectors]).any(0)

    def pooled(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled statistic of inputs with these member scores (higher = more suspicious)."""
        self._require_fitted()
        return pooled_scores({m: self.calibration_scores_[m] for m in self.detectors}, scores)

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every member's full suspicion score for every input (no early exit)."""
        self._require_fitted()
        return {name: m.scores(x) for name, m in self.members.items()}

    def screen(self, x: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flags, flagged_by)``: the guard's flags and, for each flagged input, the index in
        ``detectors`` of the member that flagged it (OR rule: the first that did, screening member by
        member — an input one member flags is not shown to the next, and members stop early where
        they can; pooled rule: the member with the smallest p-value), −1 for none. ``labels``: the
        model's labels for ``x`` if known (saves TeCo and SCALE-UP a forward pass)."""
        self._require_fitted()
        if self.rule == "pooled":
            return self._pooled_screen(x)
        by = torch.full((len(x),), -1, dtype=torch.long)
        active = torch.arange(len(x))
        for i, member in enumerate(self.members.values()):
            if not len(active):
                break
            hit = member.detect(x[active], None if labels is None else labels[active])
            by[active[hit]] = i
            active = active[~hit]
        return by >= 0, by

    def _pooled_screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled rule's flags with STRIP's early exit: the other members score first, which sets
        for each input the STRIP score above which the pooled statistic crosses its threshold; STRIP
        then copies each input only until it is sure which side it is on (it sees the whole batch, so
        its draws are those of :meth:`scores`). ``flagged_by``: the member with the smallest p-value,
        STRIP's from the copies it used."""
        strip = self.members.get("strip")
        scores = {name: m.scores(x) for name, m in self.members.items() if name != "strip"}
        if strip is None:
            flags = self.decide(scores)
        else:
            cut = score_needed(self.calibration_scores_, scores, "strip", self.pooled_threshold_, len(x))
            n = strip.detector.n
            need = (-cut * n).nan_to_num(posinf=1e30, neginf=-1.0).clamp(-1.0, 1e30)  # entropy sums
            flags, total, used = strip.detector.screen(x, need=need)
            scores["strip"] = -(total / used.clamp(min=1))
        strongest = torch.stack([pooled_scores({m: self.calibration_scores_[m]}, {m: scores[m]})
                                 for m in self.detectors]).argmax(0)
        return flags, torch.where(flags, strongest, -1)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean flags, True where the guard rejects an input."""
        return self.screen(x)[0]

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's labels for the unchanged inputs."""
        self._require_fitted()
        return next(iter(self.members.values())).labels(x)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for the unchanged inputs and the guard's flags."""
        labels = self.labels(x)
        return labels, self.screen(x, labels)[0]

    @property
    def accelerated(self) -> bool:
        """Whether the members classified through frozen copies of the model in their last calls."""
        return all(m.detector.accelerated for m in self.members.values()  # type: ignore[attr-defined]
                   if not isinstance(m.detector, LayerKnn))  # reads activations of the model itself

    # -- persistence ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Save the whole calibration as one ``.npz`` of plain arrays (no pickles), atomically."""
        self._require_fitted()
        record: dict[str, Any] = {
            "format_version": np.int64(FILE_FORMAT_VERSION), "method": self.name,
            "detectors": np.asarray(self.detectors), "frr": np.float64(self.frr),
            "tail": np.int64(self.tail_), "n_calibration": np.int64(self.n_calibration_),
            "model_sha256": self.model_sha256_,
            **{f"option.{k}": np.asarray(v) for k, v in vars(self.options()).items() if k != "detectors"}}
        for name, member in self.members.items():
            record[f"calibration.{name}"] = self.calibration_scores_[name].numpy()
            record.update({f"{name}.{k}": v for k, v in member.record().items()})
        save_npz_record(path, record)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, batch_size: int | None = None,
             accelerate: bool | None = None) -> Guard:
        """Read a guard saved by :meth:`save` for the same ``model``; never unpickles."""
        path = Path(path)
        required = {"format_version", "method", "detectors", "frr", "tail", "n_calibration", "model_sha256"}
        fields = load_npz_record(path, "guard calibration", required, fix="; recalibrate")
        num = FieldReader(fields, path)
        if num.text("method") != cls.name or num.int("format_version") != FILE_FORMAT_VERSION:
            raise TrojanscanError(f"{path}: not a guard calibration of format {FILE_FORMAT_VERSION}; "
                                  "recalibrate")
        check_same_model(path, model, num.text("model_sha256"), "the guard")
        try:
            options = {k.partition(".")[2]: CalibratedGuard._read_option(k, v)
                       for k, v in fields.items() if k.startswith("option.")}
            options.update(frr=num.float("frr"),
                           detectors=tuple(str(d) for d in np.asarray(fields["detectors"]).ravel()))
            options.setdefault("rule", "or")  # files written before the pooled rule existed
            if batch_size is not None:
                options["batch_size"] = batch_size
            if accelerate is not None:
                options["accelerate"] = accelerate
            guard = cls(model, **options)
            scores = {m: torch.from_numpy(np.asarray(fields[f"calibration.{m}"], dtype=np.float64))
                      for m in guard.detectors}
        except (TrojanscanError, KeyError, TypeError, ValueError) as e:
            raise TrojanscanError(f"{path}: {e}; the file is damaged, recalibrate") from None
        settings = {"batch_size": guard.batch_size, "accelerate": guard.accelerate}
        for name, member in guard.members.items():
            sub = {k.partition(".")[2]: v for k, v in fields.items() if k.startswith(f"{name}.")}
            member.detector = member.restore(MEMBERS[name], sub, path, model, **settings)
        guard.calibration_scores_ = scores
        try:
            guard._decide_thresholds()
        except TrojanscanError as e:
            raise TrojanscanError(f"{path}: {e}; the file is damaged, recalibrate") from None
        if guard.tail_ != num.int("tail"):
            raise TrojanscanError(f"{path}: its thresholds do not follow from its calibration scores; "
                                  "the file is damaged, recalibrate")
        guard.n_calibration_ = num.int("n_calibration")
        guard.model_sha256_ = num.text("model_sha256")
        return guard
