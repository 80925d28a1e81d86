"""The HTML scan report and trigger pictures, on hand-built scan results (no scan is run)."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trojanscan.data.triggers import Trigger
from trojanscan.defenses.scan_result import LabelResult, ScanResult
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import mask_overlap
from trojanscan.report import save_trigger_images, trigger_pngs, write_scan_report
from trojanscan.report.html import chart_png
from trojanscan.report.images import to_png_bytes

PNG_URI = "data:image/png;base64,"


def fake_scan(num_labels: int = 10, size: int = 16, channels: int = 1, flagged: tuple[int, ...] = (3,),
              warnings: list[str] | None = None) -> ScanResult:
    """A scan result with square masks whose area is the L1 norm; flagged labels get a tiny corner patch."""
    g = torch.Generator().manual_seed(0)
    labels = []
    for k in range(num_labels):
        mask = torch.zeros(size, size)
        if k in flagged:
            mask[-4:-1, -4:-1] = 1.0  # 3×3 patch in the bottom-right corner: L1 9
        else:
            side = 7 + (k % 3)
            top = int(torch.randint(0, size - side, (1,), generator=g))
            mask[top:top + side, 2:2 + side] = 0.8
        pattern = torch.rand(channels, size, size, generator=g)
        l1 = float(mask.sum())
        labels.append(LabelResult(label=k, l1_norm=l1, attack_success_rate=0.99, converged=k != 5,
                                  steps=300 + k, image_passes=1000, seconds=0.5, stop_reason="converged",
                                  final_cost=0.1, mask=mask, pattern=pattern))
    norms = torch.tensor([r.l1_norm for r in labels])
    median = float(norms.median())
    mad = 1.4826 * float((norms - median).abs().median())
    for r in labels:
        r.anomaly_index = abs(r.l1_norm - median) / mad
    model_index = max(r.anomaly_index for r in labels if r.l1_norm == float(norms.min()))
    return ScanResult(method="neural-cleanse", labels=labels, flagged_labels=list(flagged),
                      infected=bool(flagged), anomaly_index=model_index, threshold=2.0, median_l1=median,
                      mad=mad, parameters={"schedule": {"steps": 300, "lr": 0.1}, "note": "<b>&"},
                      seed=7, model_sha256="ab" * 32, data_sha256="cd" * 32, seconds=12.5,
                      input_convention="[0, 1] pixels", clean_accuracy=0.97, warnings=warnings or [])


def real_trigger(size: int = 16, channels: int = 1, target: int = 3) -> Trigger:
    mask = torch.zeros(size, size)
    mask[-4:-1, -4:-1] = 1.0
    return Trigger(mask, torch.ones(channels, size, size), target, kind="patch")


# --- images ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "mode", "side"), [
    ((16, 16), "L", 128), ((1, 16, 16), "L", 128), ((3, 32, 32), "RGB", 128), ((3, 28, 20), "RGB", 140),
    ((3, 256, 300), "RGB", 256),
])
def test_to_png_bytes_upscales_to_at_least_128(shape, mode, side):
    img = Image.open(io.BytesIO(to_png_bytes(torch.rand(shape))))
    assert img.mode == mode
    h, w = shape[-2:]
    factor = side // min(h, w)
    assert img.size == (w * factor, h * factor)
    assert min(img.size) >= 128


def test_to_png_bytes_explicit_scale_and_nearest():
    x = torch.zeros(4, 4)
    x[1, 2] = 1.0
    img = Image.open(io.BytesIO(to_png_bytes(x, scale=3)))
    assert img.size == (12, 12)
    a = torch.from_numpy(np.asarray(img).astype(np.int64))
    assert a.shape == (12, 12)
    assert set(a.unique().tolist()) == {0, 255}  # crisp: no interpolated greys
    assert int(a[3:6, 6:9].min()) == 255 and int(a.sum()) == 9 * 255


def test_to_png_bytes_refuses_bad_shapes():
    with pytest.raises(TrojanscanError):
        to_png_bytes(torch.rand(2, 8, 8))
    with pytest.raises(TrojanscanError):
        to_png_bytes(torch.rand(8))
    with pytest.raises(TrojanscanError):
        to_png_bytes(torch.rand(8, 8), scale=0)


def test_trigger_pngs_and_save(tmp_path: Path):
    result = fake_scan(num_labels=4)
    pngs = trigger_pngs(result.labels[0].mask, result.labels[0].pattern)
    assert set(pngs) == {"mask", "pattern", "fusion"}
    paths = save_trigger_images(result, tmp_path)
    assert len(paths) == 12
    assert (tmp_path / "triggers" / "label_003_fusion.png").is_file()
    assert all(p.parent == tmp_path / "triggers" for p in paths)
    assert not list((tmp_path / "triggers").glob(".*.tmp"))


# --- mask overlap ----------------------------------------------------------------------------

def test_mask_overlap_perfect_disjoint_half():
    true = torch.zeros(8, 8)
    true[0:2, 0:2] = 1
    assert mask_overlap(true * 0.7, true)["iou"] == 1.0
    disjoint = torch.zeros(8, 8)
    disjoint[6:8, 6:8] = 0.9
    ov = mask_overlap(disjoint, true)
    assert ov["iou"] == 0.0 and ov["recall"] == 0.0 and ov["k"] == 4
    half = torch.zeros(8, 8)
    half[0:2, 0] = 1.0  # two of the four real pixels
    half[7, 6:8] = 0.9  # and two elsewhere
    ov = mask_overlap(half, true)
    assert ov["recall"] == 0.5
    assert ov["iou"] == pytest.approx(2 / 6)
    assert ov["reversed_l1"] == pytest.approx(3.8) and ov["true_area"] == 4.0


def test_mask_overlap_blend_and_empty():
    blend = torch.full((6, 6), 0.2)
    ov = mask_overlap(torch.rand(6, 6), blend)
    assert ov["k"] == 36 and ov["iou"] == 1.0 and ov["true_area"] == pytest.approx(7.2)
    ov = mask_overlap(torch.rand(6, 6), torch.zeros(6, 6))
    assert ov["k"] == 0 and math.isnan(ov["iou"]) and math.isnan(ov["recall"])
    with pytest.raises(TrojanscanError):
        mask_overlap(torch.rand(5, 5), blend)


# --- HTML report -----------------------------------------------------------------------------

def test_report_infected_with_ground_truth(tmp_path: Path):
    result = fake_scan(warnings=["only 20 clean images <used>"])
    out = write_scan_report(result, tmp_path / "r" / "report.html", ground_truth=real_trigger())
    page = out.read_text(encoding="utf-8")
    assert "Backdoor detected — target label 3" in page
    assert page.count(PNG_URI) == 1 + 3 * 10 + 6  # chart, 3 per label, real + reversed trio
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert "Real trigger vs reversed" in page
    assert "only 20 clean images &lt;used&gt;" in page  # warnings shown, escaped
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page  # parameters escaped
    assert "1.00" in page  # IoU of the perfectly found patch
    assert "ab" * 32 in page and "97.0%" in page
    # table and gallery are smallest-L1 first: label 3 (L1 9) comes before every other label
    table = page[page.index("<table>"):page.index("</table>")]
    assert table.index("<td>3</td>") < table.index("<td>0</td>")


def test_report_clean_without_ground_truth(tmp_path: Path):
    result = fake_scan(flagged=())
    page = write_scan_report(result, tmp_path / "report.html", title="My <model>").read_text()
    assert "No backdoor found" in page and "Backdoor detected" not in page
    assert "Real trigger vs reversed" not in page
    assert page.count(PNG_URI) == 1 + 3 * 10
    assert "My &lt;model&gt;" in page


def test_report_nan_and_inf_do_not_crash(tmp_path: Path):
    result = fake_scan()
    result.anomaly_index = float("nan")
    result.mad = 0.0
    result.clean_accuracy = None
    result.labels[0].anomaly_index = float("inf")
    result.labels[1].anomaly_index = float("nan")
    result.labels[2].l1_norm = float("nan")
    page = write_scan_report(result, tmp_path / "report.html",
                             extra_sections=["<section><h2>STRIP</h2></section>"]).read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "∞" in text and "—" in text
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE)
    assert "<h2>STRIP</h2>" in page and page.index("<h2>STRIP</h2>") < page.index("<footer>")


def test_report_ground_truth_target_not_flagged_or_not_scanned(tmp_path: Path):
    result = fake_scan()
    page = write_scan_report(result, tmp_path / "a.html", ground_truth=real_trigger(target=4)).read_text()
    assert "not among the flagged labels" in page
    result.labels = [r for r in result.labels if r.label != 4]
    page = write_scan_report(result, tmp_path / "b.html", ground_truth=real_trigger(target=4)).read_text()
    assert "was not scanned" in page and page.count(PNG_URI) == 1 + 3 * 9 + 3
    with pytest.raises(TrojanscanError):
        write_scan_report(result, tmp_path / "c.html", ground_truth=real_trigger(size=8))


def test_chart_png_is_a_picture():
    img = Image.open(io.BytesIO(chart_png(fake_scan(num_labels=43, flagged=(33,)))))
    assert img.format == "PNG" and img.size[0] > 600 and len(img.convert("RGB").getcolors(1 << 16)) > 5


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_chromium(tmp_path: Path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    result = fake_scan(num_labels=43, size=32, channels=3, flagged=(33,),
                       warnings=["the scan stopped early for 2 labels"])
    report = write_scan_report(result, tmp_path / "report.html",
                               ground_truth=real_trigger(size=32, channels=3, target=33))
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           report.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    colors = Image.open(shot).convert("RGB").getcolors(1 << 20)
    assert colors is not None and len(colors) > 16


def test_an_additive_trigger_is_drawn_not_left_empty():
    """SIG's sinusoid lives in the trigger's offset (its mask is empty): the real-trigger pictures
    must show it rather than a black square."""
    import io

    from PIL import Image

    from trojanscan.attacks import SIG

    trigger = SIG(target=1).make_trigger((1, 16, 16))
    assert trigger.offset is not None and float(trigger.mask.sum()) == 0
    pngs = trigger_pngs(trigger.mask, trigger.pattern, trigger.offset)
    for kind in ("pattern", "fusion"):
        pixels = np.asarray(Image.open(io.BytesIO(pngs[kind])), dtype=np.float32)
        assert pixels.std() > 10, f"{kind} is flat: the sinusoid is not drawn"
    plain = np.asarray(Image.open(io.BytesIO(trigger_pngs(trigger.mask, trigger.pattern)["fusion"])))
    assert plain.std() == 0  # what the page showed before: nothing
