"""The mitigation section of the HTML report, on hand-written mitigation records (nothing is trained)."""

from __future__ import annotations

import base64
import copy
import io
import re
from pathlib import Path

from PIL import Image
from test_report import PNG_URI, fake_scan

from trojanscan.report.html import write_scan_report
from trojanscan.report.mitigation_html import mitigation_section, pruning_curve_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CURVE = [
    {"pruned": 0, "fraction": 0.0, "clean_accuracy": 0.999, "reversed_asr": 0.98, "real_asr": 1.0},
    {"pruned": 64, "fraction": 0.125, "clean_accuracy": 0.995, "reversed_asr": 0.61, "real_asr": 0.7},
    {"pruned": 128, "fraction": 0.25, "clean_accuracy": 0.99, "reversed_asr": 0.05, "real_asr": None},
    {"pruned": 162, "fraction": 0.316, "clean_accuracy": 0.988, "reversed_asr": 0.008, "real_asr": 0.01},
]

RECORDS = {
    "unlearn": {
        "command": "repair", "method": "unlearn", "labels": [0], "layer": None,
        "before": {"clean_accuracy": 0.993, "reversed_asr": 0.98, "real_asr": 1.0},
        "after": {"clean_accuracy": 0.988, "reversed_asr": 0.003, "real_asr": 0.006},
        "baselines": {"clean-only": {"clean_accuracy": 0.991, "reversed_asr": 0.95, "real_asr": 0.97},
                      "real-trigger": {"clean_accuracy": 0.989, "reversed_asr": 0.2, "real_asr": 0.001}},
        "parameters": {"epochs": 1}, "seed": 0, "seconds": 12.3,
    },
    "prune": {
        "command": "repair", "method": "prune", "labels": [0], "layer": "input of classifier",
        "before": {"clean_accuracy": 0.999, "reversed_asr": 0.98, "real_asr": 1.0},
        "after": {"clean_accuracy": 0.988, "reversed_asr": 0.008, "real_asr": 0.01},
        "pruning": {"pruned": 162, "units": 512, "fraction": 0.316, "reached": True, "asr_threshold": 0.01,
                    "curve": CURVE},
        "parameters": {}, "seed": 0, "seconds": 4.5,
    },
    "filter": {
        "command": "filter", "method": "filter", "labels": [0], "layer": "input of classifier",
        "filter": {"target_fpr": 0.05, "fpr": 0.048, "fnr_reversed": 0.013, "fnr_real": 0.0,
                   "threshold": 1.23, "neurons": [263, 261], "units": 512},
        "parameters": {}, "seed": 0, "seconds": 2.0,
    },
}


def _decode_png(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(re.escape(PNG_URI) + r"([A-Za-z0-9+/=]+)", html)]


# --- chart -----------------------------------------------------------------------------------

def test_pruning_curve_png_decodes():
    img = _decode_png(pruning_curve_png(CURVE))
    assert img.size[0] >= 400 and img.size[1] >= 200


def test_pruning_curve_png_tolerates_missing_values():
    no_real = [{k: v for k, v in p.items() if k != "real_asr"} for p in CURVE]
    assert min(_decode_png(pruning_curve_png(no_real, asr_threshold=0.01)).size) > 100
    assert min(_decode_png(pruning_curve_png([])).size) > 100
    assert min(_decode_png(pruning_curve_png([{"pruned": 3}, {"fraction": None}])).size) > 100


# --- section ---------------------------------------------------------------------------------

def test_section_numbers_order_and_chart():
    html = mitigation_section(RECORDS)
    assert html.startswith('<section class="mitigation"><h2>Mitigation</h2>') and html.endswith("</section>")
    assert "99.3% → 98.8%" in html  # unlearn clean accuracy
    assert "98.0% → 0.3%" in html  # unlearn reversed ASR
    assert "100.0% → 0.6%" in html  # unlearn real ASR
    assert "unlearn (clean images only)" in html and "unlearn (real trigger)" in html
    assert "99.3% → 99.1%" in html and "98.0% → 20.0%" in html  # baselines against the same "before"
    assert "12.3 s" in html and "4.5 s" in html
    # filter first, then prune, then unlearn
    assert (html.index("Input filter") < html.index('<td class="l">prune</td>')
            < html.index('<td class="l">unlearn</td>') < html.index("unlearn (clean images only)")
            < html.index("Pruned 162 of 512"))
    # filter facts
    for text in ("5.0%", "4.8%", "1.3%", "2 / 512", "1.230"):
        assert text in html
    # pruning sentence and the curve
    assert "Pruned 162 of 512 neurons of the input of classifier (31.6%)" in html
    assert "fell to the 1.0% threshold or below" in html
    pngs = _embedded_pngs(html)
    assert len(pngs) == 1
    assert min(_decode_png(pngs[0]).size) > 100


def test_section_escapes_strings():
    records = copy.deepcopy(RECORDS)
    evil = "<script>alert(1)</script>"
    for rec in records.values():
        rec["layer"] = evil
        rec["labels"] = [evil, 0]
    records["unlearn"]["method"] = evil
    html = mitigation_section(records)
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_section_real_asr_none_and_not_reached():
    records = copy.deepcopy({k: RECORDS[k] for k in ("prune", "unlearn")})
    for rec in records.values():
        rec["before"]["real_asr"] = None
        rec["after"]["real_asr"] = None
    records["prune"]["pruning"]["reached"] = False
    del records["unlearn"]["baselines"]
    html = mitigation_section(records)
    rows = re.findall(r"<tr><td class=\"l\">(?:prune|unlearn)</td>.*?</tr>", html)
    assert len(rows) == 2
    assert all("<td>—</td>" in r for r in rows)  # real ASR column: one dash, no "— → —"
    assert "— → —" not in html
    assert "unlearn (clean images only)" not in html and "Input filter" not in html
    assert "did <b>not</b> reach the 1.0% threshold" in html


def test_section_filter_only_and_sparse_records():
    html = mitigation_section({"filter": RECORDS["filter"]})
    assert "Input filter" in html and "Before → after" not in html and PNG_URI not in html
    sparse = mitigation_section({"filter": {"method": "filter", "filter": {"fnr_real": None}},
                                 "prune": {"method": "prune", "before": None, "after": {}, "pruning": None},
                                 "unlearn": {"method": "unlearn", "after": {"clean_accuracy": None},
                                             "baselines": None, "seconds": None}})
    assert "Input filter" in sparse and "— / —" in sparse
    assert sparse.count("<tr><td class=\"l\">") >= 2  # prune and unlearn rows, all dashes
    assert "No mitigation was run" in mitigation_section({})


def test_write_scan_report_accepts_section(tmp_path: Path):
    result = fake_scan(num_labels=4)
    section = mitigation_section(RECORDS)
    page = write_scan_report(result, tmp_path / "report.html", extra_sections=[section]).read_text("utf-8")
    assert section in page
    assert page.index("<h2>Mitigation</h2>") < page.index("<footer>")
    assert page.count(PNG_URI) == 1 + 3 * 4 + 1  # chart, trios, pruning curve
