"""The base of every workflow's result: a dataclass that writes itself as JSON."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Any

import torch

from trojanscan._version import __version__
from trojanscan.fileio import read_json, to_jsonable, write_json


def environment() -> dict[str, str]:
    """Versions and threads, recorded in every result file."""
    return {"trojanscan": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads())}


@dataclasses.dataclass
class Record:
    """A workflow's result. ``to_dict()`` is its JSON (fields marked ``internal`` in their metadata,
    such as a model or tensors, are left out); ``record["key"]`` reads a field as in a dict."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                            if not f.metadata.get("internal")})

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return any(f.name == key and getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def keys(self) -> list[str]:
        """The JSON's keys (as a dict's)."""
        return list(self.to_dict())

    def items(self) -> list[tuple[str, Any]]:
        """The JSON's items (as a dict's)."""
        return list(self.to_dict().items())

    def write(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(path, self.to_dict())


def internal(default: Any = None) -> Any:
    """A record field that stays in memory and out of the JSON (a model, tensors)."""
    return dataclasses.field(default=default, repr=False, metadata={"internal": True})


MITIGATION_JSON = "mitigation.json"


def mitigation_records(folder: str | os.PathLike, fingerprint: Any) -> dict[str, Any]:
    """The mitigation summaries in a scan folder that belong to the scan with ``fingerprint`` (a
    damaged file, or records of an earlier scan in the folder, count as none)."""
    path = Path(folder) / MITIGATION_JSON
    try:
        records = read_json(path, "mitigation record") if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(records, dict):
        return {}
    return {k: v for k, v in records.items()
            if isinstance(v, dict) and v.get("scan", {}).get("fingerprint") == fingerprint}
