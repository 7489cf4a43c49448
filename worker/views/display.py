"""Progress displays, drawn by rich: live on a terminal, one plain line per change of state elsewhere.

Piped into a file or a CI log, a display writes a line when something changes state, never one per redraw.
"""

from __future__ import annotations

from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from producer.client import TaskStatus


def table_console(file: TextIO | None = None) -> Console:
    """A console for tables: the terminal's width on a terminal; in a pipe or a file, wide enough that no
    row wraps (a log keeps one line per row)."""
    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=max(console.width, 200))


class StepProgress:
    """`render local`'s step hook: a live bar of the denoising steps on a terminal; elsewhere one line when
    the steps start and one when they end. `close()` ends a live bar that stopped early (revoke, budget)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._announced = False

    def on_step(self, info: Any) -> None:
        done, planned = info.steps_completed, info.steps_planned
        rate = done / info.elapsed if info.elapsed > 0 else 0.0
        if not self.console.is_terminal:
            if not self._announced:
                self._announced = True
                self.console.print(f"denoising: {planned} steps", highlight=False)
            if done >= planned:
                self.console.print(f"denoised: {done}/{planned} steps, {rate:.1f} it/s", highlight=False)
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("denoising"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps {task.fields[rate]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("steps", total=planned, rate="")
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=planned, rate=f"{rate:.1f} it/s")
        if done >= planned:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class JobBoard:
    """One row per job (`render demo`): live bars with step and state on a terminal; elsewhere a line each
    time a job's state changes (queued, started, progress, then its final state)."""

    def __init__(self, names: list[str], console: Console) -> None:
        self.console = console
        self.states: dict[str, str] = {}
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        width = max(len(name) for name in names)
        if console.is_terminal:
            self._progress = Progress(
                TextColumn(f"{{task.description:<{width}}}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[state]}"),
                console=console,
            )
            self._tasks = {name: self._progress.add_task(name, total=None, state="queued") for name in names}
        self._width = width

    def __enter__(self) -> JobBoard:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, name: str, status: TaskStatus) -> None:
        step, total = status.step or 0, status.total
        if self._progress is not None:
            self._progress.update(self._tasks[name], completed=step, total=total, state=status.state)
            return
        if self.states.get(name) == status.state:
            return
        self.states[name] = status.state
        where = f" at step {step}/{total}" if total else ""
        self.console.print(f"{name:<{self._width}} {status.state}{where}", highlight=False)
