"""The mitigation part of the scan report: before/after rates of ``repair``/``filter`` and the pruning curve.

Builds one HTML fragment for ``write_scan_report(..., extra_sections=[...])`` from the JSON
mitigation records; every key beyond ``method`` may be missing or ``None``.
"""

from __future__ import annotations

import io
import math
from html import escape
from typing import Any

from trojanscan.report.html import CLEAN_GREEN, FLAG_RED, _num, _pct
from trojanscan.report.page import img_tag as _img

METHOD_ORDER = ("filter", "prune", "unlearn")
BASELINE_NAMES = {"clean-only": "unlearn (clean images only)", "real-trigger": "unlearn (real trigger)"}
REAL_BLUE = "#1565c0"


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _float(x: Any) -> float | None:
    """A finite float, or ``None`` for missing, non-numeric or non-finite values."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text(x: Any) -> str:
    return "—" if x is None else escape(str(x))


def _labels(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, (list, tuple)):
        return ", ".join(escape(str(v)) for v in x) or "—"
    return escape(str(x))


def _arrow(before: Any, after: Any) -> str:
    """``before → after`` as percentages (``—`` for a missing side, one ``—`` when both are)."""
    if before is None and after is None:
        return "—"
    return f"{_pct(before)} → {_pct(after)}"


# --- chart -----------------------------------------------------------------------------------

def pruning_curve_png(curve: list[dict[str, Any]], *, asr_threshold: float | None = None) -> bytes:
    """Line plot (PNG) of clean accuracy and reversed/real-trigger ASR against the % of neurons pruned.

    Points without a value are skipped; the real-trigger line appears only when it has values.
    ``asr_threshold`` (a rate in [0, 1]), when given, is marked with a dotted line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [_dict(p) for p in (curve or [])]
    points = sorted((p for p in points if _float(p.get("fraction")) is not None),
                    key=lambda p: float(p["fraction"]))
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series = [("clean_accuracy", "clean accuracy", CLEAN_GREEN, "o"),
              ("reversed_asr", "reversed-trigger ASR", FLAG_RED, "s"),
              ("real_asr", "real-trigger ASR", REAL_BLUE, "^")]
    drawn = False
    for key, name, color, marker in series:
        xy = [(100 * float(p["fraction"]), 100 * v) for p in points if (v := _float(p.get(key))) is not None]
        if xy:
            xs, ys = zip(*xy, strict=True)
            ax.plot(xs, ys, color=color, marker=marker, markersize=3, linewidth=1.5, label=name, zorder=3)
            drawn = True
    thr = _float(asr_threshold)
    if thr is not None:
        ax.axhline(100 * thr, color="#616161", linestyle=":", linewidth=1.2, zorder=2,
                   label=f"ASR threshold {100 * thr:g}%")
    if not drawn:
        ax.text(0.5, 0.5, "no pruning steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("neurons pruned (%)")
    ax.set_ylabel("rate (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Pruning: accuracy and attack success as neurons are removed", fontsize=11)
    ax.grid(color="#e0e0e0", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    if drawn or thr is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --- section ---------------------------------------------------------------------------------

def _ordered(records: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """filter, prune, unlearn first, then any other methods by name; non-dict records are dropped."""
    others = sorted((k for k in records if k not in METHOD_ORDER), key=str)
    keys = [k for k in METHOD_ORDER if k in records] + others
    return [(k, records[k]) for k in keys if isinstance(records[k], dict)]


def _method(key: str, rec: dict[str, Any]) -> str:
    return str(rec.get("method") or key)


def _row(name: str, labels: Any, layer: Any, before: dict[str, Any], after: dict[str, Any],
         seconds: Any) -> str:
    secs = "—" if _float(seconds) is None else f"{_num(seconds, 1)} s"
    cells = "".join(f"<td>{_arrow(before.get(k), after.get(k))}</td>"
                    for k in ("clean_accuracy", "reversed_asr", "real_asr"))
    return (f'<tr><td class="l">{escape(name)}</td><td class="l">{_labels(labels)}</td>'
            f'<td class="l">{_text(layer)}</td>{cells}<td>{secs}</td></tr>')


def _before_after(items: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for key, rec in items:
        if "before" not in rec and "after" not in rec:
            continue
        before, after = _dict(rec.get("before")), _dict(rec.get("after"))
        rows.append(_row(_method(key, rec), rec.get("labels"), rec.get("layer"), before, after,
                         rec.get("seconds")))
        baselines = _dict(rec.get("baselines"))
        for bkey in [k for k in BASELINE_NAMES if k in baselines] + sorted(
                str(k) for k in baselines if k not in BASELINE_NAMES):
            name = BASELINE_NAMES.get(bkey, f"unlearn ({bkey})")
            rows.append(_row(name, rec.get("labels"), rec.get("layer"), before, _dict(baselines[bkey]), None))
    if not rows:
        return ""
    head = ('<tr><th class="l">method</th><th class="l">labels</th><th class="l">layer</th>'
            "<th>clean accuracy</th><th>reversed-trigger ASR</th><th>real-trigger ASR</th>"
            "<th>time</th></tr>")
    return ("<h3>Before → after</h3><p>Rates on held-out test images: accuracy on clean images and "
            "attack success rate (ASR) of images stamped with the reversed or the real trigger.</p>"
            f'<table class="mitigation">{head}{"".join(rows)}</table>')


def _count(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        return len(x)
    v = _float(x)
    return None if v is None else int(v)


def _filter(rec: dict[str, Any]) -> str:
    f = _dict(rec.get("filter"))
    watched, units = _count(f.get("neurons")), _count(f.get("units"))
    where = f" at the {escape(str(rec['layer']))}" if rec.get("layer") is not None else ""
    labels = f" (flagged labels {_labels(rec.get('labels'))})" if rec.get("labels") is not None else ""
    intro = (f"<p>The input filter watches the neurons{where} that the reversed triggers{labels} excite, "
             "and rejects inputs whose activation of them exceeds a threshold set on clean images.</p>")
    facts = [
        ("target false-positive rate", _pct(f.get("target_fpr"))),
        ("false-positive rate on clean test images", _pct(f.get("fpr"))),
        ("false-negative rate, reversed-trigger images", _pct(f.get("fnr_reversed"))),
        ("false-negative rate, real-trigger images", _pct(f.get("fnr_real"))),
        ("watched neurons / units", f"{_num(watched, 0)} / {_num(units, 0)}"),
        ("activation threshold", _num(f.get("threshold"), 3)),
    ]
    if _float(rec.get("seconds")) is not None:
        facts.append(("time", f"{_num(rec.get('seconds'), 1)} s"))
    rows = "".join(f'<tr><td class="l">{escape(k)}</td><td>{v}</td></tr>' for k, v in facts)
    return f'<h3>Input filter</h3>{intro}<table class="mitigation">{rows}</table>'


def _prune(rec: dict[str, Any]) -> str:
    p = _dict(rec.get("pruning"))
    if not p:
        return ""
    pruned, units = _count(p.get("pruned")), _count(p.get("units"))
    thr = _float(p.get("asr_threshold"))
    where = f" of the {escape(str(rec['layer']))}" if rec.get("layer") is not None else ""
    sentence = (f"Pruned {'—' if pruned is None else pruned} of {'—' if units is None else units} "
                f"neurons{where} ({_pct(p.get('fraction'))}).")
    thr_text = f"the {_pct(thr)} threshold" if thr is not None else "the threshold"
    if p.get("reached") is True:
        sentence += f" The reversed-trigger ASR fell to {thr_text} or below."
    elif p.get("reached") is False:
        sentence += f" The reversed-trigger ASR did <b>not</b> reach {thr_text} before pruning stopped."
    out = f"<h3>Pruning</h3><p>{sentence}</p>"
    curve = p.get("curve")
    if isinstance(curve, list) and curve:
        out += ('<div class="chart">'
                + _img(pruning_curve_png(curve, asr_threshold=thr),
                       "line chart of clean accuracy and attack success rate against neurons pruned")
                + "</div>")
    return out


def mitigation_section(records: dict[str, dict[str, Any]]) -> str:
    """One ``<section>`` fragment summarising mitigation records keyed by method (filter, prune, unlearn).

    The filter's error rates, a before/after table of the repairs (with the unlearning baselines) and the
    pruning curve, in that order; missing or ``None`` values show as ``—`` and all strings are escaped.
    """
    items = _ordered(_dict(records))
    parts = ['<section class="mitigation"><h2>Mitigation</h2>']
    if not items:
        parts.append("<p>No mitigation was run.</p>")
    filters = [rec for key, rec in items if _method(key, rec) == "filter"]
    repairs = [(key, rec) for key, rec in items if _method(key, rec) != "filter"]
    parts.extend(_filter(rec) for rec in filters)
    parts.append(_before_after(repairs))
    parts.extend(_prune(rec) for key, rec in repairs if _method(key, rec) == "prune")
    parts.append("</section>")
    return "".join(parts)
