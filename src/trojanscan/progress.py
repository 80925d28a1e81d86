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


class Stages:
    """A job's named stages reported as the steps of one task, for work that cannot report finer
    (the bar then shows which stage runs and for how long). Use as a context manager::

        with Stages(progress, "strip evaluate", 4) as stage:
            stage("calibrating"); ...
    """

    def __init__(self, progress: ProgressCallback | bool | None, task: str, total: int) -> None:
        self.report, self.task, self.total, self.step = callback(progress), task, total, 0

    def __call__(self, info: str) -> None:
        """Announce the next stage; it shows until the following one starts."""
        if self.report is not None:
            self.report(ProgressEvent(self.task, self.step, self.total, info))
        self.step += 1

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.report is not None:
            self.report(ProgressEvent(self.task, self.total, self.total, done=True))
