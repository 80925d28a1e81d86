"""One page shell for every HTML report: the shared style, inline images, an atomic write.

Reports are single self-contained files (images inline, no external links), so they can be mailed
or archived as they are.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from trojanscan.fileio import atomic_write_bytes

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
 color:#212121;background:#fafafa;line-height:1.4}
main{max-width:1180px;margin:0 auto;padding:16px 24px 32px}
h1{font-size:1.5em;margin:.6em 0 .3em}
h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.verdict{border-radius:8px;padding:16px 20px;color:#fff;margin:12px 0}
.verdict .big{font-size:2em;font-weight:700;margin:0 0 .3em}
.verdict.bad{background:#c62828}.verdict.good{background:#2e7d32}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:4px 20px;margin:0}
.facts div{font-size:.95em}.facts dt{display:inline;opacity:.85}
.facts dd{display:inline;margin:0;font-weight:600}
.warn{background:#fff8e1;border:1px solid #ffb300;border-left:6px solid #ffb300;border-radius:6px;
 padding:8px 16px;margin:12px 0}
.warn ul{margin:.3em 0;padding-left:1.2em}
.chart img{max-width:100%;height:auto;background:#fff;border:1px solid #eee}
table{border-collapse:collapse;font-size:.9em;background:#fff}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th{background:#f0f0f0;position:sticky;top:0}
tr.flag td{background:#ffebee;font-weight:600;color:#b71c1c}
td.l,th.l{text-align:left}
.scroll{max-height:460px;overflow:auto;display:inline-block;border:1px solid #ddd}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 8px}
.card.flag{border:3px solid #c62828;background:#fff5f5}
.card .head{font-size:.9em;margin-bottom:4px}.card .head b{font-size:1.1em}
.trio{display:flex;gap:6px}
.trio figure{margin:0;text-align:center;font-size:.75em;color:#616161}
.trio img{width:104px;height:104px;image-rendering:pixelated;border:1px solid #ccc;display:block;
 background:#000}
.gt .trio img{width:144px;height:144px}
.gt .row{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.tag{display:inline-block;background:#c62828;color:#fff;border-radius:3px;padding:0 5px;font-size:.8em}
.yes{color:#2e7d32;font-weight:700}.no{color:#c62828;font-weight:700}
footer{margin-top:2em;font-size:.85em;color:#555;border-top:1px solid #ddd;padding-top:.6em}
footer code{font-size:.95em;word-break:break-all}
pre{background:#f5f5f5;padding:8px;overflow:auto;font-size:.85em}
p.big{font-size:1.4em;font-weight:700}
"""

def img_tag(png: bytes, alt: str, cls: str = "") -> str:
    """An ``<img>`` with the PNG inline as a data URL."""
    data = base64.b64encode(png).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def write_page(out_path: str | Path, title: str, parts: list[str]) -> Path:
    """Write the HTML fragments ``parts`` as one page titled ``title``, atomically."""
    out_path = Path(out_path)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n")
    atomic_write_bytes(out_path, page.encode("utf-8"))
    return out_path
