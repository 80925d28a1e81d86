"""Trigger pictures for people: masks and patterns as upscaled PNGs, and how well a reversed mask matches."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trojanscan.defenses.scan_result import ScanResult
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import atomic_write_bytes

TRIGGERS_DIR = "triggers"
MIN_SIDE_PX = 128  # upscale small images until their smaller side is at least this


def _as_hwc(image: torch.Tensor) -> np.ndarray:
    """An H×W, 1×H×W or 3×H×W tensor in [0, 1] → uint8 H×W or H×W×3 (NaN shown as black)."""
    t = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and t.shape[0] != 3:
        raise TrojanscanError(f"image must be H×W, 1×H×W or 3×H×W, got shape {tuple(t.shape)}")
    if t.dim() not in (2, 3) or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise TrojanscanError(f"image must be H×W, 1×H×W or 3×H×W, got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    a = (t * 255).round().to(torch.uint8).numpy()
    return a if a.ndim == 2 else np.ascontiguousarray(a.transpose(1, 2, 0))


def upscale_factor(height: int, width: int) -> int:
    """The integer factor that makes the smaller side at least ``MIN_SIDE_PX`` (1 for big images)."""
    return max(1, math.ceil(MIN_SIDE_PX / max(1, min(height, width))))


def to_png_bytes(image: torch.Tensor, scale: int | None = None) -> bytes:
    """PNG bytes of an image in [0, 1]: grayscale for H×W or 1×H×W, RGB for 3×H×W.

    Upscaled with nearest-neighbour by an integer factor (``scale``, or enough for the smaller
    side to reach about 128 px) so that single trigger pixels stay crisp squares.
    """
    a = _as_hwc(image)
    h, w = a.shape[:2]
    factor = upscale_factor(h, w) if scale is None else int(scale)
    if factor < 1:
        raise TrojanscanError(f"image scale must be a positive integer, got {scale}")
    img = Image.fromarray(a)  # uint8 H×W → "L", H×W×3 → "RGB"
    if factor > 1:
        img = img.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def trigger_pngs(mask: torch.Tensor, pattern: torch.Tensor,
                 offset: torch.Tensor | None = None) -> dict[str, bytes]:
    """PNGs of a trigger: ``"mask"`` (white = stamped), ``"pattern"`` and ``"fusion"`` (mask ⊙ pattern).

    An additive trigger (SIG's sinusoid: ``offset``, which a mask cannot show) is drawn as the offset
    around mid-grey in ``"pattern"`` and as a mid-grey image carrying the whole trigger in ``"fusion"``.
    """
    mask = torch.as_tensor(mask, dtype=torch.float32)
    pattern = torch.as_tensor(pattern, dtype=torch.float32)
    if mask.dim() != 2 or pattern.dim() != 3 or pattern.shape[1:] != mask.shape:
        raise TrojanscanError(f"trigger mask must be H×W and pattern C×H×W of the same size, got "
                              f"{tuple(mask.shape)} and {tuple(pattern.shape)}")
    fusion = mask.unsqueeze(0) * pattern
    if offset is not None:
        offset = torch.as_tensor(offset, dtype=torch.float32)
        grey = torch.full_like(pattern, 0.5)
        fusion = ((1 - mask) * grey + mask * pattern + offset).clamp(0, 1)
        pattern = (0.5 + offset / 2).clamp(0, 1)
    return {"mask": to_png_bytes(mask), "pattern": to_png_bytes(pattern), "fusion": to_png_bytes(fusion)}


def trigger_image_paths(out_dir: Path, label: int) -> dict[str, Path]:
    """Where :func:`save_trigger_images` puts the three pictures of one label."""
    base = Path(out_dir) / TRIGGERS_DIR
    return {kind: base / f"label_{label:03d}_{kind}.png" for kind in ("mask", "pattern", "fusion")}


def save_trigger_images(result: ScanResult, out_dir: Path) -> list[Path]:
    """Write ``triggers/label_KKK_{mask,pattern,fusion}.png`` for every scanned label, atomically.

    The raw arrays are not repeated here: :meth:`ScanResult.save` writes them under ``labels/``.
    """
    written = []
    for r in result.labels:
        pngs = trigger_pngs(r.mask, r.pattern)
        for kind, path in trigger_image_paths(Path(out_dir), r.label).items():
            atomic_write_bytes(path, pngs[kind])
            written.append(path)
    return written
