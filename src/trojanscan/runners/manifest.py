"""The models of an audit: model files, folders of them, or a manifest (CSV or JSON) that gives each
model's path and, optionally, its data source, input convention, architecture and known trigger.

A manifest's relative paths are read against the manifest's folder. Every model gets a name that is
unique in the audit (its file's stem; clashing stems get a short hash of the path), which names its
result folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import parse_json
from trojanscan.models.io import TORCHSCRIPT_SUFFIXES

MODEL_SUFFIXES = (".safetensors", *TORCHSCRIPT_SUFFIXES, ".pth", ".onnx")  # what a folder is searched for
MANIFEST_SUFFIXES = (".csv", ".json")
FIELDS = ("path", "name", "data", "mean", "std", "arch", "trigger")
MAX_MANIFEST_BYTES = 16 * 2**20
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class ModelEntry:
    """One model to audit; ``None`` fields fall back to the audit's own settings."""

    path: str
    name: str = ""
    data: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    arch: str | None = None
    trigger: str | None = None


def _floats(value: Any, where: str) -> tuple[float, ...] | None:
    """A mean/std cell: a number, a list, or numbers separated by commas, semicolons or spaces."""
    if value is None or value == "":
        return None
    items = value if isinstance(value, list) else re.split(r"[,;\s]+", str(value).strip())
    try:
        numbers = tuple(float(v) for v in items if v != "")
    except (TypeError, ValueError):
        raise TrojanscanError(f"{where}: expected numbers like 0.5 or 0.485,0.456,0.406, "
                              f"got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise TrojanscanError(f"{where}: expected finite numbers, got {value!r}")
    return numbers


def _near(folder: Path, value: str) -> str:
    """A relative path is read against the manifest's folder (a name such as ``mnist`` stays as it is)."""
    candidate = folder / value
    return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value


def _entry(row: dict[str, Any], folder: Path, where: str) -> ModelEntry:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise TrojanscanError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                              f"{', '.join(FIELDS)}")
    texts = {}
    for key in ("path", "name", "data", "arch", "trigger"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise TrojanscanError(f"{where}: '{key}' must be text, got {value!r}")
        texts[key] = value.strip() if value else None
    if not texts["path"]:
        raise TrojanscanError(f"{where}: 'path' is missing")
    path = Path(texts["path"]) if Path(texts["path"]).is_absolute() else folder / texts["path"]
    if not path.is_file():
        raise TrojanscanError(f"{where}: 'path' {texts['path']}: no such model file")
    return ModelEntry(str(path), texts["name"] or "",
                      _near(folder, texts["data"]) if texts["data"] else None,
                      _floats(row.get("mean"), f"{where}: 'mean'"),
                      _floats(row.get("std"), f"{where}: 'std'"),
                      texts["arch"], str(folder / texts["trigger"]) if texts["trigger"] else None)


def read_manifest(path: str | os.PathLike) -> list[ModelEntry]:
    """The models a manifest lists: a CSV with a header row, or JSON (a list of objects, or an object
    whose ``models`` is one); an error is one line naming the row and the field."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise TrojanscanError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
    folder = path.parent
    if path.suffix.lower() == ".json":
        data = parse_json(raw, path, "manifest")
        rows = data.get("models") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise TrojanscanError(f"{path}: a JSON manifest is a list of models or {{\"models\": [...]}}")
        entries = []
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TrojanscanError(f"{path}: model {i}: expected an object with 'path', got {row!r}")
            entries.append(_entry(row, folder, f"{path}: model {i}"))
    else:
        try:
            reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
            if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
                raise TrojanscanError(f"{path}: a CSV manifest needs a header row with a 'path' column")
            entries = []
            for row in reader:
                where = f"{path}: row {reader.line_num}"
                if None in row:
                    raise TrojanscanError(f"{where}: more cells than header fields (quote a mean/std "
                                          "with commas, or separate its numbers with ';')")
                entries.append(_entry({k.strip(): v for k, v in row.items()}, folder, where))
        except (UnicodeDecodeError, csv.Error) as e:
            raise TrojanscanError(f"{path}: unreadable CSV manifest ({e})") from None
    if not entries:
        raise TrojanscanError(f"{path}: the manifest lists no models")
    return entries


def _models_in(folder: Path) -> list[ModelEntry]:
    files = sorted(p for p in folder.rglob("*") if p.suffix in MODEL_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [ModelEntry(str(p)) for p in files]


def _named(entries: list[ModelEntry]) -> list[ModelEntry]:
    """Each entry with a unique folder-safe name: the given one or the file's stem, and for stems that
    clash a short hash of the file's path (deterministic, so a rerun finds the same folders)."""
    def base(e: ModelEntry) -> str:
        return _UNSAFE.sub("_", e.name or Path(e.path).name.split(".")[0]).strip("._") or "model"

    counts: dict[str, int] = {}
    for e in entries:
        counts[base(e)] = counts.get(base(e), 0) + 1
    named = []
    for e in entries:
        name = base(e)
        if counts[name] > 1 and not e.name:
            name = f"{name}-{hashlib.sha256(str(Path(e.path).resolve()).encode()).hexdigest()[:6]}"
        named.append(replace(e, name=name))
    clashes = sorted({e.name for e in named if [n.name for n in named].count(e.name) > 1})
    if clashes:
        raise TrojanscanError(f"two models are named {clashes[0]!r}; give them different names")
    return named


def collect_models(items: Iterable[str | os.PathLike | ModelEntry]) -> list[ModelEntry]:
    """The models to audit from files, folders (every model file inside, sorted), manifests
    (``.csv``/``.json``) and entries, each file once, named uniquely."""
    entries: list[ModelEntry] = []
    for item in items:
        if isinstance(item, ModelEntry):
            entries.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = _models_in(path)
            if not found:
                raise TrojanscanError(f"{path}: no model files ({', '.join(MODEL_SUFFIXES)}) in this folder")
            entries += found
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            entries += read_manifest(path)
        elif path.is_file():
            entries.append(ModelEntry(str(path)))
        else:
            raise TrojanscanError(f"{path}: no such model file, folder or manifest")
    seen: set[Path] = set()
    unique = []
    for e in entries:
        key = Path(e.path).resolve()
        if key not in seen:
            seen.add(key)
            unique.append(e)
    if not unique:
        raise TrojanscanError("no models to audit")
    return _named(unique)
