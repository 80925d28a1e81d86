"""Progress as data: long-running engines report events to a callback and never draw anything
themselves; the CLI (or a workflow asked for progress) renders them (``report.progress``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """One step of one task: ``task`` names it (e.g. "label   7"), ``step`` of ``total`` are done."""

    task: str
    step: int
    total: int
    info: str = ""
    done: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def callback(progress: ProgressCallback | bool | None) -> ProgressCallback | None:
    """The callback itself, or None for ``True``/``False``/``None``: engines never draw, so a plain
    flag means nothing to them (the workflows turn ``True`` into rendered bars)."""
    return progress if callable(progress) else None
