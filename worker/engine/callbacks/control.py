"""The hook point for per-step job control: revocation checks, progress, leases.

Hooks run first in the callback stack after every model call (for Heun-type samplers, twice a step). A hook that raises
`JobStopped` ends the job there: the pipeline is marked interrupted and the exception leaves
the denoising loop, so no VAE decode and no upload follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from diffusers.callbacks import PipelineCallback

from worker.engine.stops import JobStopped
from worker.hooks import StepHook, StepInfo


class StepControlCallback(PipelineCallback):
    """Counts steps and runs the job's hooks."""

    tensor_inputs: list[str] = []

    def __init__(self, task_id: str, hooks: Sequence[StepHook] = (), clock: Callable[[], float] = time.perf_counter):
        # PipelineCallback.__init__ validates cutoff arguments that this callback does not have.
        self.task_id = task_id
        self.hooks = tuple(hooks)
        self.clock = clock
        self.started = clock()
        self.last_step_end: float | None = None
        self.steps_completed = 0
        self.hook_seconds = 0.0  # what the hooks cost the denoising thread, over `hook_calls` model calls
        self.hook_calls = 0
        # A job of several stages (hires fix, refiner) counts over all of them: the steps of the stages before this
        # call's, and the steps planned over all (None: the call's own).
        self.offset = 0
        self.planned: int | None = None

    def start(self) -> None:
        self.started = self.clock()
        self.last_step_end = None
        self.steps_completed = 0

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        self.on_model_call(pipeline, step_index + 1)
        return callback_kwargs

    def on_model_call(self, pipeline: Any, steps_completed: int) -> None:
        """After each model call: record the sampler steps completed so far (over the job's stages) and run the
        hooks."""
        self.steps_completed = steps_completed = self.offset + steps_completed
        self.last_step_end = self.clock()
        planned = self.planned if self.planned is not None else pipeline.num_timesteps
        info = StepInfo(self.task_id, steps_completed, planned, self.last_step_end - self.started)
        try:
            for hook in self.hooks:
                try:
                    hook.on_step(info)
                except JobStopped:
                    pipeline._interrupt = True
                    raise
        finally:
            self.hook_seconds += self.clock() - self.last_step_end
            self.hook_calls += 1
