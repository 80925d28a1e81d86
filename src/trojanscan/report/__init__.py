"""Reports for people: the self-contained HTML scan report and trigger pictures."""

from trojanscan.report.html import chart_png, write_scan_report
from trojanscan.report.images import mask_overlap, save_trigger_images, to_png_bytes, trigger_pngs

__all__ = ["chart_png", "mask_overlap", "save_trigger_images", "to_png_bytes", "trigger_pngs",
           "write_scan_report"]
