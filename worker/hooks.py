"""What a step hook sees: the contract between the engine, which runs the denoising loop, and whatever watches a job
from above it (the lease, revocation, progress and time limit of `worker.process`, the drain, the step timer).

A hook is called at the end of every model call with a `StepInfo`; it may raise `JobStopped` (`worker.engine.stops`)
to end the job there. Kept below the engine and the metrics, so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepInfo:
    """What a hook learns at the end of each denoising step."""

    task_id: str
    steps_completed: int
    steps_planned: int
    elapsed: float


class StepHook(Protocol):
    """Called at the end of every step; may raise `JobStopped` (e.g. `JobRevoked`) to stop the job."""

    def on_step(self, info: StepInfo) -> None: ...
