"""Rendering progress events as rich progress bars on the terminal (silent when not wanted).

Bars go to stderr, and only when stderr is a terminal: piped or redirected output never carries
them (nor the blank lines a bar leaves behind). :func:`set_quiet` turns them off for the process
(the CLI's ``--quiet``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from trojanscan.progress import ProgressCallback, ProgressEvent

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Draw no progress bars from now on (``True``), or draw them again where a terminal shows them."""
    global _quiet
    _quiet = bool(quiet)


def showing() -> bool:
    """Whether :func:`progress_bars` would draw: not quiet, and stderr is a terminal."""
    return not _quiet and Console(stderr=True).is_terminal


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A callback that draws one transient bar per task (e.g. per label) on stderr while the block
    runs; ``None`` when disabled, quiet or stderr is not a terminal, so engines skip formatting
    their messages."""
    if not enabled or not showing():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as bar:
        tasks: dict[str, Any] = {}

        def show(event: ProgressEvent) -> None:
            if event.task not in tasks:
                tasks[event.task] = bar.add_task(event.task, total=event.total, info="")
            bar.update(tasks[event.task], completed=event.step, info=event.info)
            if event.done:
                bar.remove_task(tasks.pop(event.task))

        yield show
