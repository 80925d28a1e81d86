"""The audit's page for people: one row per model (verdict, flagged labels, anomaly index, seconds,
error), sortable by any column, each model linked to its own scan report."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from trojanscan.report.page import write_page

# click a column's head to sort by it (again to reverse); numbers sort as numbers
SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.style.cursor = "pointer";
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var down = th.dataset.dir !== "asc"; th.dataset.dir = down ? "asc" : "desc";
    function key(r) { var c = r.cells[col]; return c.dataset.v !== undefined ? c.dataset.v : c.textContent; }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return down ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""

COLUMNS = ("model", "verdict", "flagged labels", "anomaly index", "population", "seconds", "status", "sha256")


POPULATION_NOTE = ("population: each model's reversed trigger sizes held to the same labels on the audit's "
                   "other Neural Cleanse scans of the same data (at least four models): the combined "
                   "p-value with MM-BD's where known, what it says, and the label with the smallest "
                   "excess. A shortcut every model of the data has is not evidence; a label easy on one "
                   "model only is.")


def labels_text(population: dict[str, Any]) -> str:
    """The population evidence's label(s): "label 3" or "labels 3, 5"."""
    targets = population.get("targets") or [population["target"]]
    return f"label{'s' if len(targets) > 1 else ''} {', '.join(map(str, targets))}"


def _number(value: Any, digits: int) -> tuple[str, str]:
    """(shown text, sort key) of a number that may be missing or NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "—", "-1e300"
    return f"{value:.{digits}f}", repr(float(value))


def _row(m: dict[str, Any]) -> str:
    name = escape(m["name"])
    model = f'<a href="{escape(m["report"])}">{name}</a>' if m.get("report") else name
    index, index_key = _number(m.get("anomaly_index"), 2)
    seconds, seconds_key = _number(m.get("seconds"), 1)
    population = m.get("population") or {}
    shown, population_key = _number(population.get("score"), 4)
    if population:
        shown = f"{population['says']}: {shown} ({labels_text(population)})"
    status = m["status"] if m["status"] != "error" else f"error: {m.get('error') or ''}"
    flag = ' class="flag"' if m.get("infected") or m["status"] == "error" else ""
    cells = [f'<td class="l">{model}</td>', f'<td class="l">{escape(str(m.get("verdict") or "—"))}</td>',
             f'<td>{escape(", ".join(map(str, m.get("flagged_labels") or [])) or "—")}</td>',
             f'<td data-v="{index_key}">{index}</td>', f'<td data-v="{population_key}">{escape(shown)}</td>',
             f'<td data-v="{seconds_key}">{seconds}</td>',
             f'<td class="l">{escape(status)}</td>',
             f'<td class="l"><code>{escape((m.get("sha256") or "")[:12])}</code></td>']
    return f"<tr{flag}>{''.join(cells)}</tr>"


def write_audit_report(summary: dict[str, Any], path: str | Path) -> Path:
    """Write ``audit.html`` from the content of ``audit.json``."""
    models = summary["models"]
    infected = sum(1 for m in models if m.get("infected"))
    failed = sum(1 for m in models if m["status"] == "error")
    head = "".join(f'<th class="l">{escape(c)}</th>' if c in ("model", "verdict", "status", "sha256")
                   else f"<th>{escape(c)}</th>" for c in COLUMNS)
    table = (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(_row(m) for m in models)}</tbody></table>")
    settings = summary.get("settings", {})
    facts = (f"methods {', '.join(settings.get('methods', []))}; decision {settings.get('decision', '—')}; "
             f"runner {settings.get('runner', '—')} with {settings.get('workers', '—')} worker(s)")
    return write_page(path, "Audit", [
        f"<h1>Audit: {len(models)} models, {infected} flagged, {failed} failed</h1>",
        f"<p>{escape(facts)}. Click a column's head to sort; a model's name opens its scan report.</p>",
        f"<p>{escape(POPULATION_NOTE)}</p>",
        f'<div class="scroll">{table}</div>', SORT_SCRIPT])
