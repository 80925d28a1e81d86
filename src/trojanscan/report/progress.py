"""Rendering progress events as rich progress bars on the terminal (silent when not wanted)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from trojanscan.progress import ProgressCallback, ProgressEvent


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A callback that draws one transient bar per task (e.g. per label) while the block runs;
    ``None`` when disabled, so engines skip formatting their messages."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def show(event: ProgressEvent) -> None:
            if event.task not in tasks:
                tasks[event.task] = bar.add_task(event.task, total=event.total, info="")
            bar.update(tasks[event.task], completed=event.step, info=event.info)
            if event.done:
                bar.remove_task(tasks.pop(event.task))

        yield show
