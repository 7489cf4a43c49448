"""The progress displays away from a terminal: one line per change of state, never one per redraw."""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console

from producer.client import TaskStatus
from worker.views.display import JobBoard, StepProgress, table_console


@dataclass
class Step:
    steps_completed: int
    steps_planned: int
    elapsed: float
    task_id: str = "t"


def test_the_job_board_in_a_pipe_writes_a_line_per_state_not_per_step() -> None:
    out = io.StringIO()
    with JobBoard(["short", "a-longer-name"], Console(file=out)) as board:
        board.update("short", TaskStatus("t1", "queued"))
        board.update("short", TaskStatus("t1", "started"))
        for step in range(1, 11):
            board.update("short", TaskStatus("t1", "progress", step=step, total=10))
            board.update("a-longer-name", TaskStatus("t2", "queued"))
        board.update("short", TaskStatus("t1", "succeeded", step=10, total=10))
    assert out.getvalue().splitlines() == [
        "short         queued",
        "short         started",
        "short         progress at step 1/10",
        "a-longer-name queued",
        "short         succeeded at step 10/10",
    ]


def test_the_step_bar_in_a_pipe_writes_its_start_and_its_end() -> None:
    out = io.StringIO()
    bar = StepProgress(Console(file=out))
    for step in range(1, 21):
        bar.on_step(Step(step, 20, elapsed=step * 0.5))
    bar.close()
    assert out.getvalue().splitlines() == ["denoising: 20 steps", "denoised: 20/20 steps, 2.0 it/s"]


def test_the_step_bar_on_a_terminal_draws_live_and_stops_cleanly() -> None:
    out = io.StringIO()
    bar = StepProgress(Console(file=out, force_terminal=True, width=100))
    for step in range(1, 6):
        bar.on_step(Step(step, 10, elapsed=step * 0.1))
    bar.close()  # stopped early (a revoke, a budget): the live display ends anyway
    text = out.getvalue()
    assert "denoising" in text and "5/10" in text and "\x1b[?25h" in text  # the cursor is shown again


def test_a_table_in_a_pipe_is_wide_enough_for_long_rows() -> None:
    assert table_console(io.StringIO()).width >= 200
