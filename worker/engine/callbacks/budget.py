"""Step budget: interrupt the denoising loop after N steps or S seconds; the partial image is decoded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from diffusers.callbacks import PipelineCallback

from producer.manifest import InterruptedBy
from producer.spec import StepBudget


class StepBudgetCallback(PipelineCallback):
    """Sets `pipeline._interrupt` once the budget is spent; diffusers then skips the remaining steps."""

    tensor_inputs: list[str] = []

    def __init__(self, budget: StepBudget, clock: Callable[[], float] = time.monotonic) -> None:
        # PipelineCallback.__init__ validates cutoff arguments that a budget does not have.
        self.max_steps = budget.max_steps
        self.max_seconds = budget.max_seconds
        self.clock = clock
        self.started = clock()
        self.interrupted_by: InterruptedBy | None = None
        self.offset = 0  # a later stage's call: the steps of the stages before it, which the budget counts too
        self.total: int | None = None  # the steps of all the job's stages (None: the call's own)

    def start(self) -> None:
        self.started = self.clock()
        self.interrupted_by = None

    def spent(self, done: int, steps: int) -> bool:
        """Whether the budget stops the job at the end of step `done` of `steps` (`interrupted_by` says why). Spent
        at the last step, nothing was cut short: no stop. Lone and batched calls both decide here."""
        if self.interrupted_by is None:
            if self.max_steps is not None and done >= self.max_steps:
                self.interrupted_by = "max_steps"
            elif self.max_seconds is not None and self.clock() - self.started >= self.max_seconds:
                self.interrupted_by = "max_seconds"
            if self.interrupted_by is not None and done >= steps:
                self.interrupted_by = None
        return self.interrupted_by is not None

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        total = self.total if self.total is not None else pipeline.num_timesteps
        if self.spent(self.offset + step_index + 1, total):
            pipeline._interrupt = True
        return callback_kwargs
