"""The combined guard's evaluation page: FAR/FRR of the guard and of each detector, and each
detector's suspicion scores for benign and stamped inputs with its thresholds."""

from __future__ import annotations

import io
import json
from html import escape
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trojanscan.report.page import img_tag, write_page

SCORE_LABELS = {"strip": "− entropy of the superimposed copies (bits)",
                "teco": "deviation of the benign-scaled corruption robustness",
                "scale-up": "− mean probability of losing the label when amplified",
                "ibd-psc": "− mean probability of losing the label under amplified batch norms",
                "layer-knn": "sum of the layers' standardised nearest-neighbour distances",
                "pooled": "pooled statistic: − log of the combined p-value"}
RULE_WORDS = {"or": "an input is rejected when any detector flags it",
              "pooled": "an input is rejected when the detectors' pooled evidence exceeds its threshold"}


def detector_histograms_png(benign: dict[str, torch.Tensor], trojaned: dict[str, torch.Tensor],
                            thresholds: dict[str, dict[str, float]]) -> bytes:
    """One panel per detector: its suspicion scores (higher = flagged) for benign and stamped inputs,
    with its threshold inside the guard (solid) and alone at the same FRR (dotted)."""
    names = list(benign)
    fig = Figure(figsize=(5.2 * len(names), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        b, t = benign[name].double(), trojaned[name].double()
        both = torch.cat([b, t])
        finite = both[torch.isfinite(both)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        bins = torch.linspace(lo, hi if hi > lo else lo + 1.0, 61).tolist()
        ax.hist(b.clamp(lo, hi).numpy(), bins=bins, alpha=0.6, color="#2b8a3e", label=f"benign (n={len(b)})")
        ax.hist(t.clamp(lo, hi).numpy(), bins=bins, alpha=0.6, color="#c92a2a", label=f"stamped (n={len(t)})")
        ax.axvline(thresholds[name]["in_guard"], color="black", linestyle="-", label="threshold in the guard")
        ax.axvline(thresholds[name]["alone"], color="black", linestyle=":", label="threshold alone")
        ax.set_title(name)
        ax.set_xlabel(SCORE_LABELS.get(name, "suspicion score"), fontsize=8)
        ax.set_ylabel("inputs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _percent(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def write_guard_report(record: dict[str, Any], benign: dict[str, torch.Tensor],
                       trojaned: dict[str, torch.Tensor], out_path: Path) -> Path:
    """A self-contained HTML page for ``trojanscan guard evaluate`` (``benign`` and ``trojaned``: the
    detectors' scores, and the pooled statistic under ``"pooled"`` when that rule decides)."""
    detail = record["detectors"]
    lines = {m: {"in_guard": d["in_guard"]["threshold"], "alone": d["alone"]["threshold"]}
             for m, d in detail.items()}
    rule = record.get("rule", "or")
    if record.get("pooled"):
        lines["pooled"] = {"in_guard": record["pooled"]["threshold"], "alone": record["pooled"]["threshold"]}
    png = detector_histograms_png(benign, trojaned, lines)
    rows = "".join(
        f'<tr><td class="l">{escape(m)}</td><td>{_percent(d["alone"]["far"])}</td>'
        f'<td>{_percent(d["alone"]["frr"])}</td><td>{_percent(d["in_guard"]["far"])}</td>'
        f'<td>{_percent(d["in_guard"]["frr"])}</td></tr>' for m, d in detail.items())
    summary = "".join(f'<tr><td class="l">{escape(str(k))}</td><td>{escape(str(v))}</td></tr>'
                      for k, v in record["summary"].items())
    return write_page(out_path, "Guard evaluation", [
        "<h1>Combined guard evaluation</h1>",
        f'<p class="big">FAR {_percent(record["far"])} at FRR {_percent(record["frr"])} '
        f'(target FRR {100 * record["target_frr"]:.1f}%; detectors '
        f'{escape(" + ".join(record["detector_order"]))}; '
        f"{RULE_WORDS.get(rule, escape(rule))})</p>",
        "<h2>Each detector</h2>"
        '<table><tr><th class="l">detector</th><th>FAR alone</th><th>FRR alone</th>'
        f"<th>FAR in the guard</th><th>FRR in the guard</th></tr>{rows}</table>",
        img_tag(png, "suspicion score histograms per detector"),
        f"<h2>Summary</h2><table>{summary}</table>",
        "<details><summary>All parameters</summary>"
        f"<pre>{escape(json.dumps(record, indent=2, default=str))}</pre></details>"])
