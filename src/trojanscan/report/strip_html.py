"""The STRIP evaluation page: entropy histograms of benign and trojaned inputs, FAR/FRR, speed."""

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


def entropy_histogram_png(benign: torch.Tensor, trojaned: torch.Tensor, boundary: float) -> bytes:
    """Overlaid histograms of the two entropy samples with the detection boundary marked."""
    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    top = max(float(benign.max()), float(trojaned.max()), boundary) * 1.05 or 1.0
    bins = [top * i / 60 for i in range(61)]
    ax.hist(benign.numpy(), bins=bins, alpha=0.6, color="#2b8a3e", label=f"benign (n={len(benign)})")
    ax.hist(trojaned.numpy(), bins=bins, alpha=0.6, color="#c92a2a", label=f"trojaned (n={len(trojaned)})")
    ax.axvline(boundary, color="black", linestyle="--", label=f"boundary {boundary:.3f}")
    ax.set_xlabel("normalised entropy of the perturbed copies (bits)")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_strip_report(record: dict[str, Any], benign: torch.Tensor, trojaned: torch.Tensor,
                       out_path: Path) -> Path:
    """A self-contained HTML page for ``trojanscan strip evaluate``."""
    png = entropy_histogram_png(benign, trojaned, record["boundary"])
    rows = "".join(f'<tr><td class="l">{escape(str(k))}</td><td>{escape(str(v))}</td></tr>'
                   for k, v in record["summary"].items())
    return write_page(out_path, "STRIP evaluation", [
        "<h1>STRIP evaluation</h1>",
        f'<p class="big">FAR {100 * record["far"]:.2f}% at FRR {100 * record["frr"]:.2f}% '
        f'(target FRR {100 * record["target_frr"]:.1f}%, N = {record["n"]})</p>',
        img_tag(png, "entropy histograms"),
        f"<h2>Summary</h2><table>{rows}</table>",
        "<details><summary>All parameters</summary>"
        f"<pre>{escape(json.dumps(record, indent=2, default=str))}</pre></details>"])
