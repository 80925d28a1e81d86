"""The model-zoo benchmark's summary for people: a markdown table, an HTML page and the ROC plot."""

from __future__ import annotations

import io
import math
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trojanscan.defenses.outliers import SIZE_RATIO_THRESHOLD
from trojanscan.defenses.perturbation import PerturbationEvidence
from trojanscan.defenses.registry import INSPECTORS, REVERSERS
from trojanscan.defenses.untargeted import UntargetedEvidence
from trojanscan.fileio import atomic_write_bytes
from trojanscan.report.page import img_tag, write_page

SCORE_ROWS = (("auroc", "AUROC (trojaned vs clean)", "num"),
              ("detection_rate", "detection rate (trojaned flagged)", "pct"),
              ("false_positive_rate", "false-positive rate (clean flagged)", "pct"),
              ("target_accuracy", "target-label accuracy (smallest trigger)", "pct"),
              ("detected_with_target", "flagged with the true target", "pct"),
              ("mean_iou_patch", "mean IoU with the real patch", "num"),
              ("mean_scan_seconds", "scan seconds per model (all the column's seeds)", "sec"))


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "sec":
        return f"{value:.1f}"
    return f"{value:.3f}"


def _columns(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(column title, summary) for every scan method, single-seed and seed-averaged."""
    cols = []
    for key, summary in results.get("summary", {}).items():
        if key == "strip":
            continue
        method, _, score = key.partition(" / ")
        title = f"{method}, " + ("MAD index" if score == "anomaly_index" else
                                 f"size ratio < {SIZE_RATIO_THRESHOLD:g}")
        cols.append((title, summary["single_seed"]))
        if "combined" in summary:
            cols.append((f"{title}, mean of {results['options']['repeats']} seeds",
                         summary["combined"]))
    return cols


def roc_png(results: dict[str, Any]) -> bytes:
    """ROC curves (trojaned vs clean) of every column's score."""
    cols = _columns(results)
    fig = Figure(figsize=(6, 4.6 + 0.16 * len(cols)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (title, summary) in enumerate(cols):
        roc = summary.get("roc")
        if roc:  # straight segments between the points: a tie is a diagonal step
            ax.plot(roc["fpr"], roc["tpr"], linestyle="-" if i % 2 == 0 else "--",
                    label=f"{title} (AUROC {_fmt(summary.get('auroc'), 'num')})")
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (clean models)")
    ax.set_ylabel("true-positive rate (trojaned models)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _attack_text(m: dict[str, Any]) -> str:
    spec = m["spec"]
    if not m["trojaned"]:
        return "clean"
    o = spec["attack_options"]
    if spec["attack"] == "badnets":
        where = o["position"] if isinstance(o["position"], str) else "at {},{}".format(*o["position"])
        return f"patch {o['size']}×{o['size']} {o['color']} {where}, rate {o['poison_rate']}"
    if spec["attack"] == "scatter":
        return f"{o['pixels']} {o.get('color', 'random')} pixel(s), rate {o['poison_rate']}"
    if spec["attack"] == "all-to-all":
        return f"all-to-all patch {o['size']}×{o['size']} {o.get('color', 'white')}, rate {o['poison_rate']}"
    if spec["attack"] == "blend":
        return f"blend {o['pattern']} α={o['alpha']}, rate {o['poison_rate']}"
    return f"{spec['attack']}, rate {o.get('poison_rate')}"


def evidence_summary(method: str, evidence: dict[str, Any]) -> str:
    """One line of an inspector's evidence (MM-BD, pairs, untargeted map, perturbation), for the zoo's log."""
    if method == "untargeted":
        found = UntargetedEvidence.from_dict(evidence)
        return (f"{found.l1_norm:.1f}-px trigger moves {found.success_rate:.0%}; "
                f"{len(found.mapped_pairs())} mapped sources to {found.spread} labels")
    if method == "perturbation":
        found = PerturbationEvidence.from_dict(evidence)
        return (f"smallest universal push to label {found.smallest}, "
                f"{found.ratio:.2f} of the median label's")
    if method == "mm-bd":
        top = max(range(len(evidence["statistics"])), key=lambda k: evidence["statistics"][k])
        return (f"p {evidence['p_value']:.3g}, largest margin at label {top}, "
                f"flagged {evidence['flagged_labels']}")
    best: dict[int, dict[str, Any]] = {}
    for p in evidence["pairs"]:
        if p["source"] not in best or p["l1_norm"] < best[p["source"]]["l1_norm"]:
            best[p["source"]] = p
    asym = sorted((p["source"], p["target"]) for p in best.values()
                  if p["ratio"] is not None and p["ratio"] >= 2)
    return f"{len(evidence['pairs'])} pairs; sources whose easiest pair is 2× asymmetric: {asym}"


def _model_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = [m for m in results["options"]["methods"] if m in REVERSERS]
    evidence = [m for m in results["options"]["methods"] if m in INSPECTORS]
    head = ["model", "attack", "target", "CA", "ASR"]
    seed = results["options"]["seed"]
    for method in methods:
        head += [f"{method} AI (per seed)", f"smallest / median (seed {seed})",
                 f"flagged (seed {seed})", f"patch IoU (seed {seed})"]
    for e in evidence:
        head.append({"mm-bd": "MM-BD p (flagged)", "pairs": "pairs (easiest per source)"}.get(
            e, INSPECTORS[e].title))
    if "strip" in results.get("summary", {}):
        head += ["STRIP FRR", "STRIP FAR"]
    rows = []
    for m in results["models"]:
        asr = m["attack_success_rate"]
        row = [m["name"], _attack_text(m), "—" if m["target"] is None else str(m["target"]),
               _fmt(m["clean_accuracy"], "pct"), _fmt(asr, "pct")]
        for method in methods:
            runs = m["scans"][method]["runs"]
            row += [", ".join(_fmt(r["anomaly_index"], "num") for r in runs),
                    _fmt(runs[0].get("size_ratio"), "num"), str(runs[0]["flagged_labels"]),
                    _fmt(runs[0]["iou"] if m["trigger_kind"] == "patch" else None, "num")]
        for e in evidence:
            row.append(evidence_summary(e, m["evidence"][e]["evidence"]) if e in m.get("evidence", {})
                       else "—")
        if "strip" in results.get("summary", {}):
            s = m.get("strip") or {}
            row += [_fmt(s.get("frr"), "pct"), _fmt(s.get("far"), "pct") if m["trojaned"] else "—"]
        rows.append(row)
    return head, rows


def zoo_markdown(results: dict[str, Any]) -> str:
    """The summary as markdown: scores per method, the misses, then every model."""
    cols = _columns(results)
    lines = [f"# Model-zoo benchmark ({len(results['models'])} models)", ""]
    if cols:
        lines += ["| score | " + " | ".join(t for t, _ in cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        for key, title, kind in SCORE_ROWS:
            lines.append(f"| {title} | " + " | ".join(_fmt(s.get(key), kind) for _, s in cols) + " |")
        lines.append("")
        for title, s in cols:
            for key, what in (("missed", "missed"), ("wrong_target", "wrong target"),
                              ("false_positives", "clean models flagged")):
                if s.get(key):
                    lines.append(f"- {title}, {what}: {', '.join(s[key])}")
    strip = results.get("summary", {}).get("strip")
    if strip:
        opts = results.get("options", {})
        setting = (f"N={opts.get('strip_n', '?')}, temperature {opts.get('strip_temperature', 1)}, "
                   f"{opts.get('strip_boundary', 'normal')} boundary")
        lines.append(f"- STRIP ({setting}) at 1% target FRR: mean FRR {_fmt(strip['mean_frr'], 'pct')}, "
                     f"mean FAR on trojaned models {_fmt(strip['mean_far'], 'pct')}")
    if results.get("failed_attacks"):
        lines.append(f"- attacks that did not take (ASR < 50%, left out of the scores): "
                     f"{', '.join(results['failed_attacks'])}")
    head, rows = _model_rows(results)
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_zoo_report(results: dict[str, Any], out_dir: Path) -> None:
    """Write ``summary.md``, ``roc.png`` and a self-contained ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    md = zoo_markdown(results)
    atomic_write_bytes(out_dir / "summary.md", md.encode())
    png = roc_png(results)
    atomic_write_bytes(out_dir / "roc.png", png)
    head, rows = _model_rows(results)
    cols = _columns(results)
    scores = "".join(f"<tr><td>{escape(title)}</td>"
                     + "".join(f"<td>{_fmt(s.get(key), kind)}</td>" for _, s in cols) + "</tr>"
                     for key, title, kind in SCORE_ROWS)
    table = ("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows))
    notes = "".join(f"<li>{escape(line[2:])}</li>" for line in md.splitlines() if line.startswith("- "))
    write_page(out_dir / "report.html", "Model-zoo benchmark", [
        f"<h1>Model-zoo benchmark: {len(results['models'])} models</h1>",
        f"<table><tr><th>score</th>{''.join(f'<th>{escape(t)}</th>' for t, _ in cols)}</tr>{scores}</table>",
        f"<ul>{notes}</ul>", img_tag(png, "ROC curves"),
        f'<h2>Models</h2><div class="scroll"><table>{table}</table></div>'])
