"""The engine shared by Neural Cleanse and TABOR: minimal-trigger search for many labels at once.

For each candidate target label t we look for a mask m (H×W) and pattern Δ (C×H×W), parametrised as
``m = tanh(a)/(2-ε) + 1/2`` and ``Δ = tanh(b)/(2-ε) + 1/2``, that send clean inputs stamped with
``(1-m)⊙x + m⊙Δ`` to t while keeping ``‖m‖₁`` small. The labels' losses do not interact, so a chunk
of labels is optimised in one batched forward/backward pass with a per-label Adam, per-label λ
schedule, best-result bookkeeping and early stop; a label that stops leaves the batch. This is the
same optimisation as running the labels one after another, only faster.

Where we differ from the authors' released code, on purpose: the loss uses the correct
cross-entropy (theirs swaps its arguments, making it roughly linear in 1 - p_t), Adam's epsilon
is PyTorch's (1e-8 on the bias-corrected √v instead of Keras' 1e-7), and a step's mini-batches
are whole batches drawn from a reshuffled clean set.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating

TANH_EPS = 1e-7


@dataclass(frozen=True)
class SearchSchedule:
    """Optimisation budget and the λ (cost) schedule of the trigger search.

    A *step* is ``mini_batches`` Adam updates on batches of ``batch_size`` clean images; every
    schedule decision uses the step's mean attack success rate (ASR) and mean ‖m‖₁.
    """

    steps: int = 1000
    mini_batches: int = 31
    batch_size: int = 32
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    asr_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0

    def __post_init__(self) -> None:
        if min(self.steps, self.mini_batches, self.batch_size, self.patience,
               self.early_stop_patience) < 1:
            raise TrojanscanError("steps, mini-batches, batch size and patience must be >= 1")
        if self.lr <= 0 or self.init_cost <= 0 or self.cost_up <= 1 or self.cost_down <= 1:
            raise TrojanscanError("lr and init_cost must be > 0, cost_up and cost_down > 1")
        if not 0 < self.asr_threshold <= 1:
            raise TrojanscanError(f"ASR threshold must be in (0, 1], got {self.asr_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


# The authors' released schedule: 1000 steps of 31×32 images, λ from 0, patience 5, stop after 25.
PAPER_SCHEDULE = SearchSchedule()


@dataclass
class LabelSearch:
    """The outcome of the search for one label."""

    label: int
    mask: torch.Tensor  # H×W in [0, 1]
    pattern: torch.Tensor  # C×H×W in [0, 1]
    l1_norm: float  # ‖mask‖₁ of the kept trigger
    attack_success_rate: float  # the step-mean ASR when this trigger was kept
    converged: bool  # some step reached the ASR threshold
    steps: int
    image_passes: int  # images pushed through forward+backward for this label
    seconds: float  # this label's share of the chunk's wall time
    final_cost: float
    stop_reason: str  # "early-stop" | "max-steps"
    history: dict[str, list[float]] = field(default_factory=dict)


class Regularizer(Protocol):
    """Extra per-label loss terms (TABOR's): called on every update, told each step's outcome."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor,
                 pattern: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """x: B clean images (y: their labels, if known); mask A×H×W; pattern A×C×H×W → (A,) losses."""
        ...

    def end_step(self, label: int, asr: float) -> None:
        """Called after each step of ``label`` with the step's attack success rate."""
        ...


class BatchStream:
    """Reproducible mini-batches: batch g depends only on (seed, g), not on which labels run."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.batch_size)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, g: int) -> torch.Tensor:
        epoch, j = divmod(g, self.per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size]


def _label_seed(seed: int, label: int) -> int:
    digest = hashlib.sha256(f"trigger-init:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _to_unit(p: torch.Tensor) -> torch.Tensor:
    # in float32, tanh(p) / (2 - ε) + 1/2 can round to 1 + 1.2e-7 where tanh saturates
    return (torch.tanh(p) / (2 - TANH_EPS) + 0.5).clamp(0.0, 1.0)


def _from_unit(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh((v - 0.5) * (2 - TANH_EPS))


class _LabelState:
    """Schedule bookkeeping of one label, in the order of the authors' code: keep the best
    trigger, then the early-stop test, then the λ update."""

    def __init__(self, label: int, schedule: SearchSchedule) -> None:
        self.label, self.s = label, schedule
        self.cost = 0.0
        self.set_counter = self.up_counter = self.down_counter = 0
        self.up_flag = self.down_flag = False
        self.best_l1 = math.inf
        self.best_asr = 0.0
        self.best_mask: torch.Tensor | None = None
        self.best_pattern: torch.Tensor | None = None
        self.early_best = math.inf
        self.early_counter = 0
        self.steps = 0
        self.seconds = 0.0
        self.done = False
        self.stop_reason = "max-steps"
        self.history: dict[str, list[float]] = {"asr": [], "l1": [], "cost": [], "loss": []}
        self.replay_steps = 0  # > 0: a label finished earlier, replayed for its batch place only

    def end_step(self, asr: float, l1: float, loss: float, mask: torch.Tensor,
                 pattern: torch.Tensor) -> None:
        s = self.s
        self.steps += 1
        for key, v in (("asr", asr), ("l1", l1), ("cost", self.cost), ("loss", loss)):
            self.history[key].append(v)
        if asr >= s.asr_threshold and l1 < self.best_l1:
            self.best_l1, self.best_asr = l1, asr
            self.best_mask, self.best_pattern = mask.clone(), pattern.clone()
        # early stop: no improvement of the best norm for early_stop_patience steps
        if self.best_l1 < math.inf:
            if self.best_l1 >= self.early_best * s.early_stop_threshold:
                self.early_counter += 1
            else:
                self.early_counter = 0
        self.early_best = min(self.best_l1, self.early_best)
        if self.up_flag and self.down_flag and self.early_counter >= s.early_stop_patience:
            self.done, self.stop_reason = True, "early-stop"
            return
        # λ starts at 0 and is switched on after `patience` successful steps
        if self.cost == 0 and asr >= s.asr_threshold:
            self.set_counter += 1
            if self.set_counter >= s.patience:
                self.cost = s.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if asr >= s.asr_threshold:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= s.patience:
            self.up_counter, self.up_flag = 0, True
            self.cost *= s.cost_up
        elif self.down_counter >= s.patience:
            self.down_counter, self.down_flag = 0, True
            self.cost /= s.cost_down
        if self.steps >= s.steps:
            self.done = True


StepCallback = Callable[[int, int, dict[str, float]], None]  # (label, step, stats)


def search_triggers(model: nn.Module, x_clean: torch.Tensor, labels: Sequence[int],
                    schedule: SearchSchedule = PAPER_SCHEDULE, *, chunk: int = 10, seed: int = 0,
                    regularizer: Regularizer | None = None, y_clean: torch.Tensor | None = None,
                    on_step: StepCallback | None = None,
                    on_label_done: Callable[[LabelSearch], None] | None = None,
                    replay: Mapping[int, int] | None = None) -> list[LabelSearch]:
    """Reverse-engineer a minimal trigger for each label, ``chunk`` labels per batched pass.

    ``x_clean`` are clean images in [0, 1] (``y_clean``, their labels, only feed a regularizer).
    Results come back in the order of ``labels``;
    ``on_label_done`` is called as each label finishes (to write resumable results).

    ``replay`` maps labels already finished (by an interrupted run) to the steps they ran: they
    keep their place in their chunk and in the batch for that many steps, without a result, so
    the other labels see the same batch shapes as in one uninterrupted run. The CPU kernels'
    rounding depends on the batch size (about 1e-7 per logit), and a 1000-step search with
    threshold decisions can grow that into a different kept trigger; replaying makes a resumed
    scan bit-identical to an uninterrupted one with the same ``chunk``.
    """
    if len(x_clean) == 0:
        raise TrojanscanError("the trigger search needs clean images; got none")
    if chunk < 1:
        raise TrojanscanError(f"chunk must be >= 1, got {chunk}")
    labels = [int(v) for v in labels]
    grads_before = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the trigger is optimised: skip weight gradients
    try:
        results: dict[int, LabelSearch] = {}
        replay = dict(replay or {})
        for start in range(0, len(labels), chunk):
            part = labels[start:start + chunk]
            if all(v in replay for v in part):
                continue
            for r in _search_chunk(model, x_clean, y_clean, part, schedule, seed,
                                   regularizer, on_step, on_label_done,
                                   replay={v: replay[v] for v in part if v in replay}):
                results[r.label] = r
    finally:
        for p, g in zip(model.parameters(), grads_before, strict=True):
            p.requires_grad_(g)
        model.train(was_training)
    return [results[k] for k in labels if k in results]


def search_pair_triggers(model: nn.Module, pools: Sequence[torch.Tensor], targets: Sequence[int],
                         keys: Sequence[int], schedule: SearchSchedule = PAPER_SCHEDULE, *,
                         chunk: int = 10, seed: int = 0,
                         on_label_done: Callable[[LabelSearch], None] | None = None) -> list[LabelSearch]:
    """Source-specific triggers: arm ``i`` stamps only the images ``pools[i]`` (e.g. one source
    class) and is pushed to ``targets[i]``; ``keys[i]`` names the arm in the results (its
    ``label``) and seeds its start. Same schedule, batching and rules as :func:`search_triggers`."""
    if not len(pools) == len(targets) == len(keys) or not pools:
        raise TrojanscanError("pair search needs one image pool, target and key per arm")
    if len(set(keys)) != len(keys):
        raise TrojanscanError("pair search keys must be distinct")
    if any(len(p) == 0 for p in pools):
        raise TrojanscanError("every pair needs at least one source image")
    results: dict[int, LabelSearch] = {}
    grads_before = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with evaluating(model):
            for start in range(0, len(keys), chunk):
                part = slice(start, start + chunk)
                for r in _search_chunk(model, pools[0], None, list(targets[part]), schedule, seed, None,
                                       None, on_label_done, pools=list(pools[part]),
                                       keys=list(keys[part])):
                    results[r.label] = r
    finally:
        for p, g in zip(model.parameters(), grads_before, strict=True):
            p.requires_grad_(g)
    return [results[k] for k in keys]


def search_untargeted_triggers(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor,
                               schedule: SearchSchedule, *, starts: int = 1, seed: int = 0
                               ) -> list[LabelSearch]:
    """Universal *untargeted* triggers: one mask and pattern that move clean images off their own
    label ``y_clean``, to any other (loss ``-log(1 - p_y)``; the success rate counts moved images),
    kept small by the same λ schedule. ``starts`` arms from different random starts run together;
    their results come back labelled 0..starts-1."""
    if len(x_clean) == 0 or len(y_clean) != len(x_clean):
        raise TrojanscanError("the untargeted search needs clean images and one label per image")
    if starts < 1:
        raise TrojanscanError(f"starts must be >= 1, got {starts}")
    grads_before = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with evaluating(model):
            return _search_chunk(model, x_clean, y_clean.long(), list(range(starts)), schedule, seed, None,
                                 None, None, away=True)
    finally:
        for p, g in zip(model.parameters(), grads_before, strict=True):
            p.requires_grad_(g)


def _search_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, labels: list[int],
                  s: SearchSchedule,
                  seed: int, regularizer: Regularizer | None, on_step: StepCallback | None,
                  on_label_done: Callable[[LabelSearch], None] | None,
                  pools: list[torch.Tensor] | None = None,
                  keys: list[int] | None = None,
                  replay: Mapping[int, int] | None = None, away: bool = False) -> list[LabelSearch]:
    """One batched pass over ``labels`` (the targets). All arms stamp the shared images ``x``, or,
    with ``pools``, arm i stamps only ``pools[i]``; ``keys`` name the arms (default: the labels).
    With ``away`` the arms are untargeted: each pushes the images off their own labels ``y``.
    An arm in ``replay`` only holds its place for the given number of steps (see
    :func:`search_triggers`)."""
    c, h, w = x.shape[1:]
    keys = list(labels) if keys is None else keys
    init_a, init_b = [], []
    for label in keys:  # each arm's start depends only on (seed, key)
        gen = torch.Generator().manual_seed(_label_seed(seed, label))
        init_a.append(_from_unit(torch.rand(1, h, w, generator=gen)))
        init_b.append(_from_unit(torch.rand(c, h, w, generator=gen)))
    a, b = torch.stack(init_a), torch.stack(init_b)  # K×1×H×W, K×C×H×W
    ma, va, mb, vb = (torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b),
                      torch.zeros_like(b))
    beta1, beta2 = s.betas
    t = 0  # all labels of a chunk start together, so they share Adam's step count
    states = [_LabelState(key, s) for key in keys]
    replay = replay or {}
    for st in states:
        if st.label in replay:
            st.replay_steps = replay[st.label]
    targets_all = torch.tensor(labels)
    if pools is None:
        stream = BatchStream(len(x), s.batch_size, seed)
        bsz = stream.batch_size
    else:  # every arm draws the same number of images from its own pool (small pools repeat)
        bsz = min(s.batch_size, max(len(p) for p in pools))
        pools = [p.repeat(math.ceil(bsz / len(p)), 1, 1, 1) if len(p) < bsz else p for p in pools]
        streams = [BatchStream(len(p), bsz, seed) for p in pools]
    finished: list[LabelSearch] = []
    while True:
        active = [i for i, st in enumerate(states) if not st.done]
        if all(states[i].replay_steps for i in active):
            break
        idx = torch.tensor(active)
        step_start = time.perf_counter()
        sums = torch.zeros(len(active), 4)  # asr, l1, loss, count
        for j in range(s.mini_batches):
            g = states[active[0]].steps * s.mini_batches + j
            if pools is None:
                batch = stream.indices(g)
                xb = x[batch]
                arms_x = xb.unsqueeze(0)  # 1×B×C×H×W: every arm stamps the same images
            else:
                batch = None
                arms_x = torch.stack([pools[i][streams[i].indices(g)] for i in active])  # A×B×C×H×W
                xb = arms_x[0]
            a_act = a[idx].requires_grad_(True)
            b_act = b[idx].requires_grad_(True)
            mask = _to_unit(a_act)  # A×1×H×W
            pattern = _to_unit(b_act)  # A×C×H×W
            stamped = (1 - mask).unsqueeze(1) * arms_x + (mask * pattern).unsqueeze(1)
            logits = model(stamped.reshape(-1, c, h, w))
            if away:  # every arm stamps the same batch: the targets are the images' own labels
                targets = y[batch].repeat(len(active))
                log_p = F.log_softmax(logits, 1)
                log_rest = log_p.scatter(1, targets[:, None], -math.inf).logsumexp(1)  # log(1 - p_y)
                ce = -log_rest.view(len(active), -1).mean(1)
            else:
                targets = targets_all[idx].repeat_interleave(arms_x.shape[1])
                ce = F.cross_entropy(logits, targets, reduction="none").view(len(active), -1).mean(1)
            l1 = mask.sum(dim=(1, 2, 3))
            costs = torch.tensor([states[i].cost for i in active])
            loss = ce + costs * l1
            if regularizer is not None:
                yb = None if y is None or batch is None else y[batch]
                loss = loss + regularizer(model, xb, yb, mask[:, 0], pattern, targets_all[idx])
            ga, gb = torch.autograd.grad(loss.sum(), (a_act, b_act))
            t += 1
            with torch.no_grad():
                for p, g, m1, m2 in ((a, ga, ma, va), (b, gb, mb, vb)):
                    m1[idx] = beta1 * m1[idx] + (1 - beta1) * g
                    m2[idx] = beta2 * m2[idx] + (1 - beta2) * g * g
                    m_hat = m1[idx] / (1 - beta1 ** t)
                    v_hat = m2[idx] / (1 - beta2 ** t)
                    p[idx] = p[idx] - s.lr * m_hat / (v_hat.sqrt() + 1e-8)
                hits = ((logits.argmax(1) != targets) if away else (logits.argmax(1) == targets)
                        ).float().view(len(active), -1).mean(1)
                sums += torch.stack([hits, l1.detach(), loss.detach(),
                                     torch.ones(len(active))], 1)
        share = (time.perf_counter() - step_start) / len(active)
        with torch.no_grad():
            mask_now, pattern_now = _to_unit(a[idx])[:, 0], _to_unit(b[idx])
        means = sums[:, :3] / sums[:, 3:]
        for row, i in enumerate(active):
            st = states[i]
            if st.replay_steps:  # a finished label holding its place: no bookkeeping, no result
                st.steps += 1
                st.done = st.steps >= st.replay_steps
                continue
            st.seconds += share
            asr, l1v, lossv = (float(v) for v in means[row])
            st.end_step(asr, l1v, lossv, mask_now[row], pattern_now[row])
            if regularizer is not None:
                regularizer.end_step(st.label, asr)
            if on_step is not None:
                on_step(st.label, st.steps, {"asr": asr, "l1": l1v, "cost": st.cost,
                                             "best_l1": st.best_l1, "done": float(st.done)})
            if st.done:
                result = _finish(st, mask_now[row], pattern_now[row], s, bsz)
                finished.append(result)
                if on_label_done is not None:
                    on_label_done(result)
    order = {key: i for i, key in enumerate(keys)}
    return sorted(finished, key=lambda r: order[r.label])


def _finish(st: _LabelState, mask: torch.Tensor, pattern: torch.Tensor, s: SearchSchedule,
            batch_size: int) -> LabelSearch:
    converged = st.best_mask is not None
    kept_mask = st.best_mask if converged else mask.clone()
    kept_pattern = st.best_pattern if converged else pattern.clone()
    asr = st.best_asr if converged else (st.history["asr"][-1] if st.history["asr"] else 0.0)
    return LabelSearch(
        label=st.label, mask=kept_mask, pattern=kept_pattern,  # type: ignore[arg-type]
        l1_norm=float(kept_mask.sum()), attack_success_rate=asr, converged=converged,
        steps=st.steps, image_passes=st.steps * s.mini_batches * batch_size,
        seconds=st.seconds, final_cost=st.cost, stop_reason=st.stop_reason, history=st.history)


def with_overrides(schedule: SearchSchedule, **changes: object) -> SearchSchedule:
    """A copy of ``schedule`` with the given fields changed (``None`` values are ignored)."""
    return replace(schedule, **{k: v for k, v in changes.items() if v is not None})
