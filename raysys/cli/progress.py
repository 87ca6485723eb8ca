"""Progress bars for the loop's long stages (`raysys run`, `raysys demo`): data, quality, teacher epochs, sweep
trials, register, serve.

The stages report progress as ordinary log records carrying `extra={"raysys_progress": {...}}` (the workflow,
Ray Train and Ray Tune layers cannot import the CLI, and the jobs keep their plain log lines and their
last-line-JSON contract untouched). Here a logging handler turns those records into `rich` progress bars, on
a terminal only: when stdout is not a TTY (CI, a pipe, `ray job submit`) nothing is installed and the same
records print as the plain log lines they are.

A record's `raysys_progress`: `{"task": name, "event": "start" | "advance" | "done", "completed": int,
"total": int | None}` (`completed`/`total` in the task's own unit: epochs, trials; None: a spinner).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

PROGRESS_KEY = "raysys_progress"
LOGGER = "raysys"  # every emitter logs under it: raysys (stages), raysys.train..., raysys.distill...


def progress_extra(task: str, event: str, completed: int = 0, total: int | None = None) -> dict[str, Any]:
    """The `extra=` of a log record that reports progress (what the emitters write, spelled once for tests)."""
    return {PROGRESS_KEY: {"task": task, "event": event, "completed": completed, "total": total}}


class ConsoleFilter(logging.Filter):
    """What a quiet console (`raysys run`/`demo` with a log file, not `--verbose`) shows of the log: the stage
    lines (logger `raysys`), every warning, and of the progress records (teacher epochs, sweep trials) the first
    of each task and then at most one every `every_s` seconds. Everything goes to the log file."""

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name == LOGGER:
            return True
        info = getattr(record, PROGRESS_KEY, None)
        if not isinstance(info, dict):
            return False
        task, now = str(info.get("task")), time.monotonic()
        if task in self.last and now - self.last[task] < self.every_s:
            return False
        self.last[task] = now
        return True


class ProgressHandler(logging.Handler):
    """Log records with `raysys_progress` -> tasks of one `rich.progress.Progress`."""

    def __init__(self, progress: Progress):
        super().__init__(level=logging.DEBUG)
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, PROGRESS_KEY, None)
        if not isinstance(info, dict) or "task" not in info:
            return
        completed, total = info.get("completed") or 0, info.get("total")
        if not isinstance(completed, int) or not (total is None or isinstance(total, int)):
            return  # the rich display would raise while rendering, in its own thread
        try:
            self._update(str(info["task"]), info.get("event", "advance"), completed, total)
        except Exception:  # noqa: BLE001 - a progress bar must never fail the stage it shows
            self.handleError(record)

    def _update(self, name: str, event: str, completed: int, total: int | None) -> None:
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = self.progress.add_task(name, total=total, completed=completed)
        if total is not None:
            self.progress.update(task, total=total)
        if event == "done":
            t = {x.id: x for x in self.progress.tasks}[task]
            final = t.total if t.total is not None else max(completed, 1)
            self.progress.update(task, total=final, completed=final)
            self.progress.stop_task(task)
        else:
            self.progress.update(task, completed=completed)


def make_progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description:<16}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False)


@contextmanager
def stage_progress(console: Console, *, enabled: bool | None = None) -> Iterator[ProgressHandler | None]:
    """Progress bars for the stages run inside the block, on `console` when it is a terminal (`enabled`
    overrides the check). Yields the handler (None when plain lines are used instead). The bars stop before the
    block's caller prints anything else: the JSON summary after the block stays its own last lines."""
    if not (console.is_terminal if enabled is None else enabled):
        yield None
        return
    progress = make_progress(console)
    handler = ProgressHandler(progress)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    progress.start()
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        progress.stop()
