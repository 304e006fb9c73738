"""Progress display for the slow stages: model loading, activation extraction, weight diffs.

On an interactive terminal in a single-process run it draws a live rich progress bar.
Under pytest-xdist workers (``PYTEST_XDIST_WORKER`` set), in CI (``CI`` set), and when
the stream is not a TTY it draws nothing and instead sends ONE line per finished stage,
``reasondiff: activations toy-base 16/16 traces in 1.2s``, to a sink the plugin
controls (by default the ``reasondiff.progress`` logger). Pure display; no metric code.

Usage::

    with progress_for("activations", len(traces), subject="toy-base", unit="traces") as step:
        for trace in traces:
            ...
            step()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

LineSink = Callable[[str], None]
_LOG = logging.getLogger("reasondiff.progress")


def _log_sink(line: str) -> None:
    _LOG.info(line)


@dataclass(frozen=True)
class ProgressSettings:
    """What the plugin decides for the whole process (see :func:`configure`).

    ``stream``: where a live bar draws (None: ``sys.stderr`` at the time of use, so
    pytest's capture is respected). ``sink``: receives the one line per finished stage.
    ``enabled``: live bar on (True), off (False) or auto (None).
    """

    stream: TextIO | None = None
    sink: LineSink = _log_sink
    enabled: bool | None = None


_settings = ProgressSettings()
_lock = threading.Lock()


def current_settings() -> ProgressSettings:
    return _settings


def configure(settings: ProgressSettings) -> ProgressSettings:
    """Install process-wide settings; returns the previous ones so they can be restored.

    The plugin typically does
    ``configure(replace(current_settings(), sink=terminalreporter.write_line))``.
    """
    global _settings
    with _lock:
        previous, _settings = _settings, settings
    return previous


def live_bar_wanted(
    enabled: bool | None, stream: TextIO, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether a live bar may draw: never in an xdist worker; else ``enabled`` if given;
    else only on a TTY that is not a dumb terminal and not a CI log."""
    env = os.environ if environ is None else environ
    if env.get("PYTEST_XDIST_WORKER"):
        return False  # workers' output is not a terminal the user sees
    if enabled is not None:
        return enabled
    if env.get("CI") or env.get("TERM", "") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or odd stream
        return False


def stage_line(
    stage: str, subject: str, done: int, total: int | None, unit: str, seconds: float
) -> str:
    """``reasondiff: activations toy-base 16/16 traces in 1.2s`` (subject may be empty)."""
    count = f"{done}/{total}" if total is not None else str(done)
    who = f" {subject}" if subject else ""
    return f"reasondiff: {stage}{who} {count} {unit} in {seconds:.1f}s"


class Stage:
    """One running stage. Call it (or :meth:`advance`) once per finished item.

    Calling it with a string counts one item and shows the string as the current item
    on the live bar, so a Stage can be passed straight to the ``progress:
    Callable[[str], None]`` hooks of the loaders (e.g. ``stream_weight_diff``, which
    calls it once per tensor).
    """

    def __init__(self, name: str, subject: str, total: int | None, unit: str) -> None:
        if total is not None and total < 0:
            raise ValueError(f"progress total for {name} {subject} must be >= 0, got {total}")
        self.name = name
        self.subject = subject
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.perf_counter()
        self.current = ""
        self._on_advance: Callable[[int, str], None] | None = None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._on_advance is not None:
            self._on_advance(n, self.current)

    def __call__(self, item: int | str = 1) -> None:
        if isinstance(item, str):
            self.current = item
            self.advance(1)
        else:
            self.advance(item)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


#: The type callers receive: a Stage is callable as ``advance()``.
Advance = Stage


class _LiveBar:
    """One rich Progress per process, shared by nested stages (rich allows one live
    display at a time, so a second concurrent bar must be a task of the first)."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._users = 0

    def add(self, stage: Stage, stream: TextIO) -> TaskID:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with _lock:
            if self._progress is None:
                console = Console(file=stream, markup=False, highlight=False)
                self._progress = Progress(
                    TextColumn("reasondiff {task.description}", markup=False),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[current]}", markup=False, style="dim"),
                    console=console,
                    transient=True,
                )
                self._progress.start()
            self._users += 1
            label = f"{stage.name} {stage.subject}".strip() + f" ({stage.unit})"
            return self._progress.add_task(label, total=stage.total, current="")

    def advance(self, task: TaskID, n: int, current: str) -> None:
        if self._progress is not None:
            self._progress.update(task, advance=n, current=current)

    def remove(self, task: TaskID) -> None:
        with _lock:
            if self._progress is None:
                return
            self._progress.remove_task(task)
            self._users -= 1
            if self._users == 0:
                self._progress.stop()
                self._progress = None


_live = _LiveBar()


@contextmanager
def progress_for(
    stage: str,
    total: int | None,
    *,
    subject: str = "",
    unit: str = "items",
    enabled: bool | None = None,
    sink: LineSink | None = None,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[Stage]:
    """Show progress for one stage; emit one summary line to the sink when it ends.

    Arguments left as None fall back to the process settings (:func:`configure`).
    If the body raises, the line still goes out, marked ``(interrupted: <error>)``, and
    the error propagates unchanged.
    """
    settings = _settings
    out = stream or settings.stream or sys.stderr
    emit = sink or settings.sink
    want = enabled if enabled is not None else settings.enabled
    item = Stage(stage, subject, total, unit)
    task: TaskID | None = None
    if live_bar_wanted(want, out, environ):
        task = bar_task = _live.add(item, out)
        item._on_advance = lambda n, current: _live.advance(bar_task, n, current)
    error: BaseException | None = None
    try:
        yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        if task is not None:
            _live.remove(task)
        line = stage_line(stage, subject, item.done, total, unit, item.elapsed())
        if error is not None:
            line += f" (interrupted: {type(error).__name__})"
        emit(line)
