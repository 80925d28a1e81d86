"""Reports for people: the self-contained HTML scan, STRIP and guard reports and trigger pictures."""

from trojanscan.report.guard_html import write_guard_report
from trojanscan.report.html import chart_png, write_scan_report
from trojanscan.report.images import save_trigger_images, to_png_bytes, trigger_pngs
from trojanscan.report.mitigation_html import mitigation_section, pruning_curve_png
from trojanscan.report.strip_html import entropy_histogram_png, write_strip_report

__all__ = ["chart_png", "entropy_histogram_png", "mitigation_section",
           "pruning_curve_png", "save_trigger_images",
           "to_png_bytes", "trigger_pngs", "write_guard_report", "write_scan_report", "write_strip_report"]
