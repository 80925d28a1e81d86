"""The human-facing scan report: one self-contained HTML page with the verdict, chart, table and triggers."""

from __future__ import annotations

import io
import json
import math
from html import escape
from pathlib import Path
from typing import Any

from trojanscan._version import __version__
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.outliers import SIZE_RATIO_THRESHOLD
from trojanscan.defenses.registry import REVERSERS
from trojanscan.defenses.scan_result import LabelResult, ScanResult
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import to_jsonable
from trojanscan.metrics import mask_overlap
from trojanscan.report.images import trigger_pngs
from trojanscan.report.page import img_tag as _img
from trojanscan.report.page import write_page

FLAG_RED = "#c62828"
CLEAN_GREEN = "#2e7d32"
BAR_GREY = "#9e9e9e"


# --- formatting ------------------------------------------------------------------------------

def _num(x: Any, digits: int = 2) -> str:
    """A number for people: ``—`` for missing/NaN, ``∞`` for infinity."""
    if x is None:
        return "—"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return escape(str(x))
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}f}"


def _pct(x: Any) -> str:
    if x is None:
        return "—"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return escape(str(x))
    return "—" if not math.isfinite(v) else f"{100 * v:.1f}%"


def _sort_key(r: LabelResult) -> tuple[bool, float, int]:
    """Smallest L1 first; non-finite norms last."""
    v = float(r.l1_norm)
    return (not math.isfinite(v), v if math.isfinite(v) else 0.0, r.label)


# --- chart -----------------------------------------------------------------------------------

def chart_png(result: ScanResult) -> bytes:
    """Bar chart (PNG) of the reversed-trigger L1 norm per label, flagged labels in red.

    A solid line marks the median and a dashed one the detection boundary
    ``median − threshold · MAD`` (when positive): bars below it with a large anomaly index are flagged.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sorted(result.labels, key=lambda r: r.label)
    n = len(rows)
    flagged = set(result.flagged_labels)
    heights = [float(r.l1_norm) if math.isfinite(float(r.l1_norm)) else 0.0 for r in rows]
    colors = [FLAG_RED if r.label in flagged else BAR_GREY for r in rows]

    fig = Figure(figsize=(max(8.0, min(16.0, 0.24 * n + 2)), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(n))
    ax.bar(positions, heights, color=colors, width=0.8, zorder=2)
    handles: list[Any] = [Patch(color=BAR_GREY, label="label")]
    if flagged:
        handles.append(Patch(color=FLAG_RED, label="flagged label"))
    median = float(result.median_l1) if result.median_l1 is not None else float("nan")
    if math.isfinite(median):
        handles.append(ax.axhline(median, color="#1565c0", linewidth=1.2, zorder=3,
                                  label=f"median {median:.1f}"))
        mad = float(result.mad) if result.mad is not None else float("nan")
        boundary = median - float(result.threshold) * mad
        if math.isfinite(boundary) and boundary > 0:
            label = f"boundary {boundary:.1f} (median − {_num(result.threshold, 1)}·MAD)"
            handles.append(ax.axhline(boundary, color=FLAG_RED, linestyle="--", linewidth=1.2, zorder=3,
                                      label=label))
    if n:
        step = max(1, math.ceil(n / 60))  # keep tick labels legible for many labels
        ax.set_xticks(positions[::step])
        ax.set_xticklabels([str(r.label) for r in rows[::step]], fontsize=7 if n > 20 else 9,
                           rotation=90 if n > 20 else 0)
        ax.set_xlim(-0.7, n - 0.3)
    else:
        ax.text(0.5, 0.5, "no labels scanned", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("label")
    ax.set_ylabel("L1 norm of reversed mask")
    ax.set_title("Reversed-trigger size per label (small = suspicious)", fontsize=11)
    ax.grid(axis="y", color="#e0e0e0", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --- page sections ---------------------------------------------------------------------------




def evidence_strength(anomaly_index: float, threshold: float, flagged: bool) -> str:
    """How strong the outlier evidence is, in words: the anomaly index against the threshold."""
    if anomaly_index is None or not math.isfinite(anomaly_index) or not threshold or threshold <= 0:
        return "no outlier test"
    ratio = anomaly_index / threshold
    if flagged:
        word = "strong" if ratio >= 2 else "clear" if ratio >= 1.25 else "weak"
        return (f"{word} evidence: anomaly index {anomaly_index:.2f}, {ratio:.1f}× the threshold "
                f"{threshold:g}")
    word = "borderline" if ratio >= 0.75 else "no outlier"
    return f"{word}: anomaly index {anomaly_index:.2f}, below the threshold {threshold:g}"


def score_phrase(verdict: dict[str, Any]) -> str:
    """The combined verdict's score and what it is held to, for a headline."""
    cuts = verdict.get("thresholds")
    held = (f"; backdoored below {cuts['backdoored']:g}, suspicious below {cuts['suspicious']:g}"
            if cuts else "")
    if int(verdict.get("rule_version", 0)) < 4:  # rules 1-3 scored by Bonferroni's bound
        return f"score {_num(verdict.get('score'), 3)} (chance bound for a clean model)"
    return f"score {_num(verdict.get('score'), 3)} (combined p-value for a clean model{held})"


def verdict_banner(result: ScanResult) -> tuple[str, str, str]:
    """The scan's headline for people: ``(kind, headline, strength)`` with kind "bad", "good" or
    "none" (no verdict: too few labels for the outlier test), and how strong the evidence is."""
    flagged = [int(v) for v in result.flagged_labels]
    verdict = result.extra.get("verdict")
    if verdict:  # the combined verdict decides; its score is a p-value for a clean model
        strength = score_phrase(verdict)
        targets = ", ".join(f"label {t}" for t in verdict.get("targets", []))
        if verdict.get("verdict") == "suspicious":
            return "bad", f"Suspicious — {targets}", strength
    else:
        strength = evidence_strength(result.anomaly_index, result.threshold, bool(flagged))
    if result.infected or flagged:
        headline = "Backdoor detected"
        if flagged:
            headline += f" — target label{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))}"
        return "bad", headline, strength
    if not verdict and not math.isfinite(float(result.anomaly_index)):
        why = "fewer than 3 labels scanned" if len(result.labels) < 3 else "the outlier test had no answer"
        return "none", f"No verdict — {why}, so no outlier test", ""
    return "good", "No backdoor found", strength


def size_ratio_text(ratio: float) -> str:
    """The smallest reversed trigger over the median label's, said against its threshold."""
    if ratio is None or not math.isfinite(float(ratio)):
        return "—"
    side = "below" if ratio < SIZE_RATIO_THRESHOLD else "above"
    return f"{ratio:.2f} ({side} the {SIZE_RATIO_THRESHOLD:g} that suggests a backdoor)"


def _verdict(result: ScanResult) -> str:
    cls, headline, strength = verdict_banner(result)
    facts = [
        ("Anomaly index", f"{_num(result.anomaly_index)} (threshold {_num(result.threshold, 1)})"),
        ("Method", escape(str(result.method))),
        ("Clean accuracy on scan data", _pct(result.clean_accuracy)),
        ("Input convention", escape(str(result.input_convention))),
        ("Model file", escape(str((result.extra.get("model_trust") or {}).get("trust", "—")))),
        ("Scan time", f"{_num(result.seconds, 1)} s"),
        ("Image passes", f"{result.image_passes:,}"),
        ("Labels scanned", str(len(result.labels))),
        ("Median L1 / MAD", f"{_num(result.median_l1, 1)} / {_num(result.mad, 1)}"),
        ("Smallest / median L1", size_ratio_text(result.size_ratio)),
    ]
    items = "".join(f"<div><dt>{k}:</dt> <dd>{v}</dd></div>" for k, v in facts)
    grey = ' style="background:#616161"' if cls == "none" else ""
    out = (f'<section class="verdict {cls}"{grey}><p class="big">{escape(headline)}</p>'
           + (f"<p>{escape(strength)}</p>" if strength else "")
           + f'<dl class="facts">{items}</dl></section>')
    if result.warnings:
        lis = "".join(f"<li>{escape(str(w))}</li>" for w in result.warnings)
        out += f'<div class="warn"><b>⚠ Warnings</b><ul>{lis}</ul></div>'
    return out


def _evidence(result: ScanResult) -> str:
    """The combined verdict's evidence, one row per piece (when the scan used --decision verdict)."""
    verdict = result.extra.get("verdict")
    if not verdict:
        return ""
    rows = "".join(
        f'<tr><td class="l">{escape(str(e["name"]))}</td><td class="l">{escape(str(e["says"]))}</td>'
        f"<td>{_num(e['value'], 3)}</td><td>{_num(e['threshold'], 3)}</td>"
        f"<td>{_num(e.get('p_value'), 3)}</td>"
        f'<td class="l">{escape(", ".join(map(str, e.get("targets", []))))}</td>'
        f'<td class="l">{escape(str(e.get("detail", "")))}</td></tr>' for e in verdict["evidence"])
    paper = result.extra.get("paper", {})
    return ("<h2>Verdict and its evidence</h2>"
            f"<p><b>{escape(verdict['verdict'])}</b> — targets {escape(str(verdict['targets']))}, kind "
            f"{escape(str(verdict.get('kind')))}, score {_num(verdict['score'], 3)} "
            f"({escape(str(verdict.get('score_meaning', '')))}). The paper's MAD test alone flagged "
            f"{escape(str(paper.get('flagged_labels')))}.</p>"
            '<table><tr><th class="l">evidence</th><th class="l">says</th><th>value</th><th>threshold</th>'
            f'<th>p-value</th><th class="l">targets</th><th class="l">detail</th></tr>{rows}</table>')


def _chart(result: ScanResult) -> str:
    return ('<h2>Reversed-trigger size per label</h2><div class="chart">'
            + _img(chart_png(result), "bar chart of the L1 norm per label") + "</div>")


def _table(result: ScanResult, rows: list[LabelResult]) -> str:
    flagged = set(result.flagged_labels)
    method = REVERSERS.get(result.method)  # the method's own per-label scores beside the L1 verdict
    scores = [sc for sc in (method.label_scores if method else ())
              if any(sc.key in r.extra for r in rows)]
    summary_key = method.outlier_summary if method else None
    q_flagged = set((result.extra.get(summary_key) or {}).get("flagged_labels", [])) if summary_key else set()
    q_head = "".join(f"<th>{escape(sc.title)}</th>" for sc in scores)
    head = ("<tr><th>label</th><th>L1 norm</th><th>anomaly index</th>" + q_head + "<th>trigger ASR</th>"
            '<th class="l">converged</th><th>steps</th><th class="l">flagged</th></tr>')
    body = []
    for r in rows:
        is_flag = r.label in flagged
        row_cls = ' class="flag"' if is_flag else ""
        marks = (["● backdoor target"] if is_flag else []) + (
            [f"{summary_key} outlier"] if r.label in q_flagged else [])
        q_cells = "".join(f"<td>{_num(r.extra.get(sc.key))}</td>" for sc in scores)
        body.append(
            f'<tr{row_cls}><td>{r.label}</td><td>{_num(r.l1_norm, 1)}</td>'
            f"<td>{_num(r.anomaly_index)}</td>{q_cells}<td>{_pct(r.attack_success_rate)}</td>"
            f'<td class="l">{"yes" if r.converged else "no"}</td><td>{int(r.steps):,}</td>'
            f'<td class="l">{" · ".join(marks)}</td></tr>')
    return ("<h2>All labels, smallest trigger first</h2>"
            f'<div class="scroll"><table>{head}{"".join(body)}</table></div>')


def _trio(pngs: dict[str, bytes], what: str) -> str:
    names = {"mask": "mask", "pattern": "pattern", "fusion": "mask ⊙ pattern"}
    figs = "".join(f"<figure>{_img(pngs[k], f'{what} {names[k]}')}<figcaption>{escape(names[k])}"
                   "</figcaption></figure>" for k in ("mask", "pattern", "fusion"))
    return f'<div class="trio">{figs}</div>'


def _gallery(result: ScanResult, rows: list[LabelResult]) -> str:
    flagged = set(result.flagged_labels)
    cards = []
    for r in rows:
        is_flag = r.label in flagged
        tag = ' <span class="tag">FLAGGED</span>' if is_flag else ""
        cards.append(
            f'<div class="card{" flag" if is_flag else ""}"><div class="head"><b>label {r.label}</b>{tag}'
            f" · L1 {_num(r.l1_norm, 1)} · anomaly {_num(r.anomaly_index)}</div>"
            f"{_trio(trigger_pngs(r.mask, r.pattern), f'label {r.label}')}</div>")
    return ("<h2>Reversed triggers, smallest first</h2>"
            f'<div class="gallery">{"".join(cards)}</div>')


def _ground_truth(result: ScanResult, truth: Trigger) -> str:
    target = truth.target
    flagged = [int(v) for v in result.flagged_labels]
    found = target in flagged
    status = (f'<span class="yes">yes</span> — label {target} is flagged' if found else
              f'<span class="no">no</span> — label {target} is not among the flagged labels '
              f"({', '.join(map(str, flagged)) or 'none'})")
    real = (f"<div><h3>Real trigger ({escape(truth.kind)}, target {target})</h3>"
            f"{_trio(trigger_pngs(truth.mask, truth.pattern, truth.offset), 'real trigger')}</div>")
    try:
        rev = result.label(target)
    except TrojanscanError:
        return ('<section class="gt"><h2>Real trigger vs reversed</h2>'
                f'<div class="row">{real}</div><p>Label {target} was not scanned, so there is no '
                "reversed trigger to compare.</p></section>")
    if tuple(rev.mask.shape) != tuple(truth.mask.shape):
        raise TrojanscanError(f"ground-truth trigger is for {tuple(truth.mask.shape)} images but the "
                              f"scan's masks are {tuple(rev.mask.shape)}; pass the trigger of this model")
    ov = mask_overlap(rev.mask, truth.mask)
    reversed_html = (f"<div><h3>Reversed trigger of label {target}</h3>"
                     f"{_trio(trigger_pngs(rev.mask, rev.pattern), f'reversed label {target}')}</div>")
    facts = (f"<ul><li>True target among flagged labels: {status}</li>"
             f"<li>Mask IoU (top-{ov['k']} reversed pixels vs real trigger pixels): "
             f"<b>{_num(ov['iou'])}</b></li>"
             f"<li>Recall of real trigger pixels: <b>{_pct(ov['recall'])}</b></li>"
             f"<li>Reversed mask L1 {_num(ov['reversed_l1'], 1)} vs real trigger area "
             f"{_num(ov['true_area'], 1)}</li>"
             f"<li>Anomaly index of label {target}: {_num(rev.anomaly_index)}</li></ul>")
    return ('<section class="gt"><h2>Real trigger vs reversed</h2>'
            f'<div class="row">{real}{reversed_html}</div>{facts}</section>')


def _footer(result: ScanResult) -> str:
    data = result.extra.get("data") or {}
    params = json.dumps(to_jsonable(result.parameters), indent=2, ensure_ascii=False, default=str)
    return ("<footer><details><summary>Scan parameters</summary>"
            f"<pre>{escape(params)}</pre></details>"
            f"<p>Model sha256 <code>{escape(str(result.model_sha256))}</code><br>"
            f"Data sha256 <code>{escape(str(data.get('sha256', '—')))}</code> "
            f"({escape(str(data.get('name', '—')))}, as training records it)<br>"
            f"Scanned subset sha256 <code>{escape(str(result.data_sha256))}</code><br>"
            f"Seed {escape(str(result.seed))} · trojanscan {escape(__version__)}</p></footer>")


def write_scan_report(result: ScanResult, out_path: Path, *, ground_truth: Trigger | None = None,
                      title: str | None = None, extra_sections: list[str] | None = None) -> Path:
    """Write one self-contained HTML report of a scan (images inline, no external links), atomically.

    ``ground_truth`` (the planted trigger, when known) adds a real-vs-reversed comparison;
    ``extra_sections`` are raw HTML fragments appended after the built-in sections.
    """
    out_path = Path(out_path)
    title = title or f"Backdoor scan report — {result.method}"
    rows = sorted(result.labels, key=_sort_key)
    parts = [
        f"<h1>{escape(title)}</h1>",
        _verdict(result),
        _evidence(result),
        _chart(result),
        _table(result, rows),
        _gallery(result, rows),
    ]
    if ground_truth is not None:
        parts.append(_ground_truth(result, ground_truth))
    parts.extend(extra_sections or [])
    parts.append(_footer(result))
    return write_page(out_path, title, parts)
