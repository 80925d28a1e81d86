"""The pooled decision of the combined guard: one statistic from every member's evidence, one threshold.

The OR rule (flag when any member flags) gives each member a share of the benign tail, so an input
that two or three members find somewhat odd — each below its own share — passes. The pooled rule
turns each member's suspicion score into a p-value against the benign calibration scores, pools them,
and flags the inputs whose pooled statistic exceeds the conformal quantile of the calibration
inputs' own pooled statistics (so a fresh benign input is flagged with probability about ``frr``).

- **Member p-values.** Within the benign calibration scores, the conformal p-value
  ``(1 + #{benign ≥ s}) / (n + 1)``; above the largest ``TAIL_SHARE`` of them, an exponential tail
  fitted to their excesses (peaks over a threshold: ``p = m/(n+1) · exp(−(s − u)/β)`` with ``u`` the
  (m+1)-th largest benign score and ``β`` the mean excess of the m above it), so a score far beyond
  every benign one keeps gaining weight instead of stopping at ``1/(n+1)``. A calibration input's own
  p-value leaves it out (exact leave-one-out).
- **Pooling.** The stronger of Fisher's combination ``P(Gamma(M) ≥ Σ −log p)`` (evidence spread over
  members) and Šidák's minimum ``1 − (1 − min p)^M`` (evidence from one member alone, as the OR rule
  sees it); the statistic is ``−log`` of the smaller. Fisher alone lost all-to-all backdoors that one
  member catches by itself on the development zoos, hence the minimum.

The p-values are not independent (the members look at the same input), so neither combined p-value
is exact; the threshold does not rely on them: it is calibrated on the pooled statistics of benign
inputs. Fixed on the world zoos of seeds 1200 and 1300 (README, "A pooled decision for the guard").
"""

from __future__ import annotations

import math

import torch

from trojanscan.errors import TrojanscanError

TAIL_SHARE = 0.05  # the share of benign scores whose excesses fit the exponential tail
MIN_TAIL = 5  # at least this many benign scores in the tail fit
SMALLEST_P = 1e-300  # p-values are clipped here (the statistic stays finite)


def _tail_size(n: int) -> int:
    return min(n - 1, max(MIN_TAIL, round(TAIL_SHARE * n)))


def _tail_fit(ordered: torch.Tensor) -> tuple[int, float, float]:
    """``(m, u, β)`` from benign scores sorted in descending order."""
    m = _tail_size(len(ordered))
    u = float(ordered[m])
    beta = float((ordered[:m] - u).mean())
    return m, u, beta


def _p_from(ordered: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    """p-values of scores ``s`` against ``n`` benign scores ``ordered`` (descending)."""
    m, u, beta = _tail_fit(ordered)
    at_least = n - torch.searchsorted(ordered.flip(0).contiguous(), s, right=False)
    p = (1 + at_least).double() / (n + 1)
    above = s > u
    if above.any():
        excess = (s[above] - u) / beta if beta > 0 else torch.full_like(s[above], math.inf)
        p[above] = (m / (n + 1)) * torch.exp(-excess)
    return p.clamp(min=SMALLEST_P)


def _benign(benign: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(benign, dtype=torch.float64).flatten()
    if len(b) < MIN_TAIL + 2:
        raise TrojanscanError(f"the pooled rule needs at least {MIN_TAIL + 2} benign scores per detector, "
                              f"got {len(b)}")
    if not torch.isfinite(b).all():
        raise TrojanscanError("benign scores contain NaN or infinity; check the model's outputs")
    return b


def member_p_values(benign: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Each score's p-value against the benign calibration scores (see the module notes)."""
    b = _benign(benign)
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    return _p_from(b.sort(descending=True).values, s, len(b))


def calibration_p_values(benign: torch.Tensor) -> torch.Tensor:
    """Each benign calibration score's p-value against the others (exact leave-one-out)."""
    b = _benign(benign)
    n = len(b)
    order = b.argsort(descending=True, stable=True)
    ordered = b[order]
    # below the others' tail, a score's p-value is (1 + others ≥ it) / n: its count among all of them
    p = (n - torch.searchsorted(ordered.flip(0).contiguous(), ordered, right=False)).double() / n
    for r in range(min(_tail_size(n - 1) + 1, n)):  # the top ones: against the others' own tail fit
        p[r] = _p_from(torch.cat([ordered[:r], ordered[r + 1:]]), ordered[r:r + 1], n - 1)[0]
    out = torch.empty_like(p)
    out[order] = p
    return out.clamp(min=SMALLEST_P)


def pooled_statistic(p_values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``−log min(Fisher's p, Šidák's min-p)`` over the members' p-values (one tensor per member, the
    same inputs in each): higher means more suspicious."""
    if not p_values:
        raise TrojanscanError("the pooled rule needs at least one detector's p-values")
    logs = -torch.stack([torch.as_tensor(p, dtype=torch.float64).clamp(SMALLEST_P, 1.0).log()
                         for p in p_values.values()])  # M × N, each −log p ≥ 0
    members = len(logs)
    total = logs.sum(0)
    # log P(Gamma(M, 1) ≥ total) = −total + log Σ_{i<M} total^i / i!
    i = torch.arange(members, dtype=torch.float64)[:, None]
    terms = i * total.clamp(min=SMALLEST_P).log() - torch.lgamma(i + 1)
    log_fisher = -total + torch.logsumexp(terms, 0)
    # log(1 − (1 − p_min)^M), stable for tiny p_min
    log_sidak = torch.log(-torch.expm1(members * torch.log1p(-torch.exp(-logs.max(0).values))))
    return -torch.minimum(log_fisher, log_sidak).clamp(max=0.0)


def pooled_scores(benign: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled statistic of inputs with member ``scores``, against the members' benign scores."""
    missing = sorted(set(benign) - set(scores))
    if missing:
        raise TrojanscanError(f"scores are missing for detector(s) {', '.join(missing)}")
    return pooled_statistic({m: member_p_values(b, scores[m]) for m, b in benign.items()})


def calibration_pooled_scores(benign: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled statistic of each benign calibration input, each member's p-value leaving it out."""
    lengths = {len(torch.as_tensor(b).flatten()) for b in benign.values()}
    if len(lengths) != 1:
        raise TrojanscanError("every detector needs the same benign inputs")
    return pooled_statistic({m: calibration_p_values(b) for m, b in benign.items()})


def score_needed(benign: dict[str, torch.Tensor], others: dict[str, torch.Tensor], member: str,
                 threshold: float, count: int, steps: int = 200) -> torch.Tensor:
    """For each input, the score of ``member`` above which the pooled statistic exceeds ``threshold``,
    given the other members' scores for ``count`` inputs (−inf: flagged whatever it scores; +inf:
    never flagged). The statistic rises with every member's score, so this lets a member stop early
    (STRIP's copies) with the pooled verdict unchanged (bisection: exact up to ~1e-12 of the range)."""
    p_others = {m: member_p_values(b, others[m]) for m, b in benign.items() if m != member}
    own = _benign(benign[member])
    ordered = own.sort(descending=True).values
    m, u, beta = _tail_fit(ordered)

    def flagged(s: torch.Tensor) -> torch.Tensor:
        p = _p_from(ordered, s, len(ordered))
        return pooled_statistic({**p_others, member: p}) > threshold

    lo = torch.full((count,), float(ordered[-1]) - 1.0, dtype=torch.float64)  # p = 1
    reach = math.log((m / (len(ordered) + 1)) / SMALLEST_P) * max(beta, 1e-12)
    hi = torch.full((count,), u + reach + 1.0, dtype=torch.float64)  # p at the clip
    always, never = flagged(lo), ~flagged(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        up = flagged(mid)
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
        if bool(((hi - lo) <= 1e-12 * (1.0 + hi.abs())).all()):
            break
    return torch.where(always, -math.inf, torch.where(never, math.inf, lo))
