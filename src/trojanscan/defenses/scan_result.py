"""What a trigger-search scan found: per-label results, the outlier verdict, and their files.

Layout of a scan folder::

    scan.json            the verdict, per-label table, parameters, hashes, cost
    labels/label_007.npz one per finished label (mask, pattern, record): the resume state
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trojanscan.data.triggers import Trigger
from trojanscan.defenses.outliers import size_ratio
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import (
    load_npz_record,
    parse_json,
    read_json,
    save_npz_record,
    to_jsonable,
    write_json,
)

LABELS_DIR = "labels"
SCAN_JSON = "scan.json"


@dataclass
class LabelResult:
    """The reversed trigger of one candidate label and how it scores."""

    label: int
    l1_norm: float
    attack_success_rate: float
    converged: bool
    steps: int
    image_passes: int
    seconds: float
    stop_reason: str
    final_cost: float
    mask: torch.Tensor = field(repr=False)
    pattern: torch.Tensor = field(repr=False)
    anomaly_index: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific scores

    def record(self) -> dict[str, Any]:
        """The JSON-able part (no arrays)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("mask", "pattern", "extra")}
        d.update(self.extra)
        return d

    def trigger(self) -> Trigger:
        # clamp: files from before the search clamped its tanh can hold -6e-8 or 1+1e-7
        return Trigger(self.mask.clamp(0, 1), self.pattern.clamp(0, 1), self.label, kind="reversed",
                       params={"l1_norm": self.l1_norm})


def _number(v: Any) -> float:
    """JSON null (how NaN is written) back to NaN; numbers unchanged."""
    return float("nan") if v is None else float(v)


def label_file(out_dir: Path, label: int) -> Path:
    return out_dir / LABELS_DIR / f"label_{label:03d}.npz"


def save_label(out_dir: Path, result: LabelResult, fingerprint: str) -> None:
    """Write one finished label atomically, tagged with the scan's fingerprint."""
    record = {**result.record(), "extra": result.extra, "fingerprint": fingerprint}
    save_npz_record(label_file(out_dir, result.label), {
        "mask": result.mask.numpy(), "pattern": result.pattern.numpy(),
        "record": json.dumps(to_jsonable(record))})


def load_label(path: Path, fingerprint: str | None = None) -> LabelResult | None:
    """Read one saved label; ``None`` if it belongs to a scan with other settings or is damaged."""
    try:
        z = load_npz_record(path, "label result", ("record", "mask", "pattern"))
        record = parse_json(str(z["record"]), path, "label record")
        mask = torch.from_numpy(z["mask"].astype(np.float32))
        pattern = torch.from_numpy(z["pattern"].astype(np.float32))
    except Exception:  # a damaged resume file only means the label is not done
        return None
    if not isinstance(record, dict):
        return None
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return None
    extra = record.pop("extra", {}) or {}
    keep = {"label", "l1_norm", "attack_success_rate", "converged", "steps", "image_passes",
            "seconds", "stop_reason", "final_cost"}
    fields = {k: record[k] for k in keep if k in record}
    if len(fields) != len(keep):
        return None
    return LabelResult(**fields, mask=mask, pattern=pattern, extra=extra)


@dataclass
class ScanResult:
    """The answer of a scan: is the model infected, which labels, with which triggers."""

    method: str
    labels: list[LabelResult]
    flagged_labels: list[int]
    infected: bool
    anomaly_index: float
    threshold: float
    median_l1: float
    mad: float
    parameters: dict[str, Any]
    seed: int
    model_sha256: str
    data_sha256: str
    seconds: float
    input_convention: str
    clean_accuracy: float | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_passes(self) -> int:
        return sum(r.image_passes for r in self.labels)

    @property
    def size_ratio(self) -> float:
        """Smallest reversed-trigger L1 over the median one (see ``outliers.size_ratio``)."""
        return size_ratio([r.l1_norm for r in self.labels])

    def label(self, label: int) -> LabelResult:
        for r in self.labels:
            if r.label == label:
                return r
        raise TrojanscanError(f"label {label} was not scanned")

    def trigger(self, label: int | None = None) -> Trigger:
        """The reversed trigger of ``label`` (default: the most anomalous label)."""
        if label is None:
            label = min(self.labels, key=lambda r: r.l1_norm).label
        return self.label(label).trigger()

    def to_dict(self, timings: bool = True) -> dict[str, Any]:
        """The JSON of ``scan.json``; ``timings=False`` leaves out the seconds (the one thing a
        resumed or repeated scan may change), to compare two scans."""
        if not timings:
            d = self.to_dict()
            d.pop("seconds")
            for r in d["labels"]:
                r.pop("seconds")
            return d
        return to_jsonable({
            "method": self.method, "infected": self.infected,
            "flagged_labels": self.flagged_labels, "anomaly_index": self.anomaly_index,
            "threshold": self.threshold, "median_l1": self.median_l1, "mad": self.mad,
            "clean_accuracy": self.clean_accuracy, "input_convention": self.input_convention,
            "seconds": self.seconds, "image_passes": self.image_passes, "seed": self.seed,
            "size_ratio": self.size_ratio,
            "model_sha256": self.model_sha256, "data_sha256": self.data_sha256,
            "parameters": self.parameters, "warnings": self.warnings, **self.extra,
            "labels": [r.record() for r in self.labels],
        })

    def save(self, out_dir: str | os.PathLike, write_labels: bool = True) -> Path:
        """Write ``scan.json`` and (unless already written) each label's arrays."""
        out = Path(out_dir)
        fingerprint = str(self.parameters.get("fingerprint", ""))
        if write_labels:
            for r in self.labels:
                save_label(out, r, fingerprint)
        write_json(out / SCAN_JSON, self.to_dict())
        return out / SCAN_JSON

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanResult:
        """Read a scan folder (or its ``scan.json``) back, arrays included."""
        path = Path(path)
        out = path.parent if path.name == SCAN_JSON else path
        try:
            data = read_json(out / SCAN_JSON, "scan result")
        except FileNotFoundError:
            runs = sorted(p.name for p in out.glob("seed-*") if (p / SCAN_JSON).is_file())
            if runs:  # the folder of a repeated scan: each run is a scan of its own
                raise TrojanscanError(f"{out} holds a repeated scan ({', '.join(runs)}); pass one run's "
                                      f"folder, e.g. {out / runs[0]}") from None
            raise TrojanscanError(f"{out / SCAN_JSON}: no such scan result; run trojanscan scan "
                                  "first") from None
        except TrojanscanError:
            raise
        except (OSError, ValueError) as e:
            raise TrojanscanError(f"{out / SCAN_JSON}: unreadable scan result ({e})") from None
        try:
            return cls._from_dict(data, out)
        except TrojanscanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrojanscanError(f"{out / SCAN_JSON}: incomplete scan result ({e!r})") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any], out: Path) -> ScanResult:
        fingerprint = data["parameters"].get("fingerprint")
        labels = []
        for rec in data["labels"]:
            r = load_label(label_file(out, int(rec["label"])), fingerprint)
            if r is None:
                raise TrojanscanError(f"{label_file(out, int(rec['label']))}: missing, damaged or "
                                      "from another scan; rerun the scan")
            r.anomaly_index = _number(rec.get("anomaly_index"))
            labels.append(r)
        known = {"method", "infected", "flagged_labels", "anomaly_index", "threshold", "median_l1",
                 "size_ratio",
                 "mad", "clean_accuracy", "input_convention", "seconds", "image_passes", "seed",
                 "model_sha256", "data_sha256", "parameters", "warnings", "labels"}
        return cls(method=data["method"], labels=labels, flagged_labels=data["flagged_labels"],
                   infected=data["infected"], anomaly_index=_number(data["anomaly_index"]),
                   threshold=data["threshold"], median_l1=data["median_l1"], mad=data["mad"],
                   parameters=data["parameters"], seed=data["seed"],
                   model_sha256=data["model_sha256"], data_sha256=data["data_sha256"],
                   seconds=data["seconds"], input_convention=data["input_convention"],
                   clean_accuracy=data.get("clean_accuracy"), warnings=data.get("warnings", []),
                   extra={k: v for k, v in data.items() if k not in known})
