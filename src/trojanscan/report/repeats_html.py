"""The page of a repeated scan (``scan --repeats N``): the verdict on the averaged trigger norms, each
label's mean and per-seed norms, the spread of the runs' anomaly indices, and a link to every run."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from trojanscan.defenses.repeats import RepeatedScan
from trojanscan.report.page import write_page


def _n(x: float, digits: int = 2) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def write_repeats_report(combined: RepeatedScan, out_dir: str | Path, run_dirs: list[str]) -> Path:
    """Write ``out_dir/report.html`` for ``combined``; ``run_dirs`` are the runs' folders in it."""
    spread = combined.spread()
    runs = combined.runs
    if math.isnan(combined.anomaly_index):
        banner = ("No verdict", f"{len(combined.labels)} labels are too few for an outlier test")
    elif combined.infected:
        banner = ("BACKDOOR DETECTED", f"label(s) {combined.flagged_labels} flagged on the mean trigger "
                  f"norms of {len(runs)} seeds (anomaly index {combined.anomaly_index:.2f} > "
                  f"{combined.threshold:g})")
    else:
        banner = ("No backdoor found", f"anomaly index {combined.anomaly_index:.2f} of the mean trigger "
                  f"norms of {len(runs)} seeds (threshold {combined.threshold:g})")
    head = [f"<th>seed {r.seed}</th>" for r in runs]
    rows = []
    for k, mean, index in sorted(zip(combined.labels, combined.mean_l1, combined.label_anomaly_index,
                                     strict=True), key=lambda t: t[1]):
        per_seed = "".join(f"<td>{_n(r.label(k).l1_norm, 1)}{' ⚑' if k in r.flagged_labels else ''}</td>"
                           for r in runs)
        flag = " ⚑" if k in combined.flagged_labels else ""
        rows.append(f"<tr><td>{k}{flag}</td><td>{_n(mean, 1)}</td><td>{_n(index)}</td>{per_seed}</tr>")
    links = " · ".join(f'<a href="{escape(d)}/report.html">{escape(d)}</a>' for d in run_dirs)
    parts = [
        f"<h1>{escape(runs[0].method)} — {len(runs)} seeds</h1>",
        f"<p><b>{escape(banner[0])}</b>: {escape(banner[1])}. Size ratio of the mean norms "
        f"{_n(combined.size_ratio)}; smallest mean trigger at label {combined.predicted_target}.</p>",
        f"<p>The runs' own anomaly indices: {', '.join(_n(v) for v in spread['anomaly_index'])} "
        f"(mean {_n(spread['mean'])}, standard deviation {_n(spread['std'])}); labels each run "
        f"flagged: {escape(str(spread['flagged_by_runs']))}.</p>",
        "<table><thead><tr><th>label</th><th>mean L1</th><th>anomaly index</th>" + "".join(head)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
        f"<p>⚑ flagged. Each run's report, with its reversed triggers: {links}</p>",
    ]
    return write_page(Path(out_dir) / "report.html", f"{runs[0].method} × {len(runs)} seeds", parts)
