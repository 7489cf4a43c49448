"""What `render batch` shows: one live line for the whole batch, the status table, and the gallery's rows."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from producer.batch import BatchHandle, BatchProgress
from producer.client import TaskStatus
from worker.views.gallery import IndexRow


class BatchDisplay:
    """done/total, running, failed, images/s and ETA: redrawn in place on a terminal, a line every
    `every` seconds (and at the end) elsewhere, so a CI log stays short."""

    def __init__(self, name: str, stream: TextIO | None = None, *, every: float = 10.0) -> None:
        self.name = name
        self.console = Console(file=stream or sys.stderr)
        self.every = every
        self.started = time.monotonic()
        self.first: BatchProgress | None = None
        self._live: Live | None = None
        self._printed = 0.0

    def __enter__(self) -> BatchDisplay:
        if self.console.is_terminal:
            self._live = Live(Text(""), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def line(self, progress: BatchProgress) -> str:
        if self.first is None:
            self.first = progress
        elapsed = max(time.monotonic() - self.started, 1e-6)
        finished_now = progress.finished - self.first.finished
        images_now = progress.images - self.first.images
        left = progress.total - progress.finished - progress.states["unknown"]
        eta = "-"
        if finished_now > 0 and left > 0:
            eta = _duration(left * elapsed / finished_now)
        elif left == 0:
            eta = "done"
        failed = progress.states["failed"] + progress.states["revoked"] + progress.states["expired"]
        return (
            f"batch {self.name}: {progress.finished}/{progress.total} done, {progress.running} running, "
            f"{progress.states['queued']} queued, {failed} failed, revoked or expired, "
            f"{images_now / elapsed:.2f} images/s, ETA {eta}"
        )

    def update(self, progress: BatchProgress) -> None:
        text = self.line(progress)
        if self._live is not None:
            row = Table.grid(padding=(0, 1))
            row.add_row(ProgressBar(total=max(progress.total, 1), completed=progress.finished, width=30), Text(text))
            self._live.update(row)
            return
        now = time.monotonic()
        if progress.done or now - self._printed >= self.every:
            self.console.print(text, highlight=False, soft_wrap=True)
            self._printed = now


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _seconds(status: TaskStatus) -> float | None:
    manifest = status.manifest
    if manifest is None:
        return None
    try:
        span = datetime.fromisoformat(manifest.finished_at) - datetime.fromisoformat(manifest.started_at)
    except ValueError:
        return None
    return round(span.total_seconds(), 3)


def index_rows(handle: BatchHandle, specs: dict[str, dict[str, Any]] | None = None) -> list[IndexRow]:
    """The gallery's rows, in line order: from each job's manifest once final, else from `specs` (by task id)."""
    rows = []
    for line, status in handle.results():
        manifest = status.manifest
        spec = manifest.spec if manifest is not None else (specs or {}).get(status.task_id, {})
        sampler = None
        if manifest is not None and manifest.scheduler is not None:
            sampler = manifest.scheduler.label or manifest.scheduler.name
        elif spec.get("scheduler"):
            sampler = str(spec["scheduler"])
        rows.append(
            IndexRow(
                line=line,
                task_id=status.task_id,
                status=status.state,
                seconds=_seconds(status),
                images=list(manifest.images) if manifest is not None else [],
                frames=list(manifest.frames) if manifest is not None else [],
                prompt=str(spec.get("prompt", "")),
                seed=manifest.seed if manifest is not None else spec.get("seed"),
                sampler=sampler,
                model=str(spec.get("model", "")),
                error=status.error,
            )
        )
    return rows


def status_table(handle: BatchHandle, progress: BatchProgress, rows: list[IndexRow], *, limit: int = 20) -> str:
    """`render batch status`: the counts, then every line that did not succeed (up to `limit`)."""
    counts = ", ".join(f"{count} {state}" for state, count in sorted(progress.states.items()))
    out = [f"batch {handle.name}: {progress.finished}/{progress.total} done ({counts}); {progress.images} images"]
    trouble = [row for row in rows if row.status not in ("succeeded", "interrupted")]
    for row in trouble[:limit]:
        out.append(f"  line {row.line} ({row.task_id}): {row.status}" + (f": {row.error}" if row.error else ""))
    if len(trouble) > limit:
        out.append(f"  ... and {len(trouble) - limit} more (see --json)")
    return "\n".join(out)
