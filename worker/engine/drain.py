"""A worker's hand-off on SIGTERM: jobs that will not finish within `RENDER_DRAIN_SECONDS` go back to their queue.

Spot and preemptible machines get a notice (about 2 minutes on AWS, 30 s on GCP, a pod's grace period on
Kubernetes) and then vanish. Once `Drain.begin` is called, the GPU takes no new job (`GpuRunner.drain` hands the
waiting ones back at once), and a job on the GPU stays only if its remaining steps, at its own pace so far, end
before the deadline; otherwise it checkpoints at its next step's end and is handed back too (`HandedOff`), and the
task puts it on its queue again as its next attempt, which resumes from that checkpoint. The step hook that decides
is `worker.engine.callbacks.drain.DrainHook`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.hooks import StepInfo


class Drain:
    """The process's drain deadline: none until `begin`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline: float | None = None

    def begin(self, seconds: float) -> None:
        if self.deadline is None:
            self.deadline = self.clock() + seconds

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def leaves(self, info: StepInfo) -> bool:
        """Whether the job at `info` must be handed back: past the deadline, or not done by it at its pace."""
        if self.deadline is None:
            return False
        now = self.clock()
        if now >= self.deadline or info.steps_completed <= 0:
            return now >= self.deadline
        left = (info.steps_planned - info.steps_completed) * info.elapsed / info.steps_completed
        return now + left > self.deadline
