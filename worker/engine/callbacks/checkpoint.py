"""The step callback that checkpoints a job every few seconds of denoising and resumes it from a checkpoint.

See `worker.engine.checkpoints` for what a checkpoint holds and why a resume replays the steps before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from worker.engine.callbacks.budget import StepBudgetCallback
from worker.engine.callbacks.frames import FrameWriter
from worker.engine.checkpoints import (
    Checkpoint,
    CheckpointUnsupported,
    CheckpointWriter,
    restore_scheduler,
    scheduler_state,
)
from worker.engine.stops import HandedOff
from worker.models.families import ModelFamily, ModelOff

log = logging.getLogger(__name__)


class CheckpointCallback(PipelineCallback):
    """Last in a job's chain, so a checkpoint holds the latents every other callback settled on.

    `bind(pipe, generators)` before the pipeline call, `release()` after it, whatever happened. With `hand_off` set
    (a draining worker's `DrainHook`), the next step's end stores a checkpoint, waits for it, and raises `HandedOff`.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        writer: CheckpointWriter,
        interval: float,
        *,
        seed: int,
        digest: str,
        resume: Checkpoint | None = None,
        budget: StepBudgetCallback | None = None,
        frames: FrameWriter | None = None,
        family: ModelFamily | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # PipelineCallback.__init__ validates cutoff arguments that a checkpoint does not have.
        self.writer = writer
        self.interval = interval
        self.seed = seed
        self.digest = digest
        self.resume = resume
        self.budget = budget
        self.frames = frames
        self.family = family
        self.clock = clock
        self.last = clock()
        self.generators: Sequence[torch.Generator] = ()
        self._model_off: ModelOff | None = None
        self.unsupported = False
        self.bound = False  # in a pipeline call (alone, or a batch's: `bind_batch`)
        self.hand_off = False
        self.stage = 0  # the stage whose call runs (`enter_stage`); a checkpoint records it
        self.offset = 0  # the job's steps in the stages before it: a checkpoint's `step` counts over all stages

    def enter_stage(self, stage: int, offset: int) -> None:
        """The job's stage `stage` begins, after `offset` steps of the ones before it."""
        self.stage, self.offset = stage, offset

    @property
    def replaying(self) -> int | None:
        """The step within this stage that a resume restores (its checkpoint is of this stage), else None."""
        if self.resume is None or self.resume.stage != self.stage:
            return None
        return self.resume.step - self.offset

    def bind(self, pipe: Any, generators: Sequence[torch.Generator]) -> None:
        """The run is starting on `pipe` with these generators; a resume turns the model off until its step."""
        self.generators = generators
        self.last = self.clock()
        self.bound = True
        if self.replaying is not None:
            if self.family is None:
                raise ValueError("a resume needs the job's model family (CheckpointCallback(family=...))")
            self._model_off = self.family.model_off(pipe)

    def release(self) -> None:
        self.bound = False
        self._release_model()

    def _release_model(self) -> None:
        if self._model_off is not None:
            self._model_off.close()
            self._model_off = None

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        done = step_index + 1
        replaying = self.replaying
        if replaying is not None and done <= replaying:
            if done < replaying and self.hand_off:  # still replaying: the stored checkpoint stands
                raise HandedOff(self.offset + done)
            if done == replaying:
                loop = callback_kwargs["latents"]
                callback_kwargs["latents"] = _like(self._restore(pipeline, _as_tensor(loop)), loop)
            if not self.hand_off:
                return callback_kwargs
        latents = _as_tensor(callback_kwargs["latents"])
        if self.step_end(pipeline.scheduler, done, pipeline.num_timesteps, latents, self.generators):
            raise HandedOff(self.offset + done)
        return callback_kwargs

    def bind_batch(self) -> None:
        """The job runs in a batch of several: `worker.engine.batching` captures its rows at its steps' ends."""
        self.last = self.clock()
        self.bound = True

    def step_end(
        self,
        scheduler: Any,
        done: int,
        steps: int,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        rows: tuple[slice, int] | None = None,
    ) -> bool:
        """The end of step `done` of `steps`, for a lone call and a batch's rows alike: checkpoint when the job is
        handed off or one is due (see `capture` for `rows`); whether the job is handed off (it leaves the call)."""
        leaving = self.leaving(done, steps)
        if leaving or self.due(done, steps):
            self.capture(scheduler, done, latents, generators, rows=rows)
        return leaving

    def leaving(self, done: int, steps: int) -> bool:
        """Whether the job is handed off at the end of step `done` of `steps` (not at the last: it is ending)."""
        return self.hand_off and done < steps

    def due(self, done: int, steps: int) -> bool:
        """Whether the interval calls for a checkpoint at the end of step `done` of `steps` (never the last)."""
        return done < steps and self.interval > 0 and self.clock() - self.last >= self.interval

    def capture(
        self,
        scheduler: Any,
        done: int,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        rows: tuple[slice, int] | None = None,
    ) -> None:
        """Checkpoint step `done`: `latents` and `generators` are the job's; in a batch, `rows` (this job's rows of
        the call, and the call's row count) picks its rows of the scheduler's per-row state. A hand-off waits for
        the write: the process is about to go. A scheduler whose state cannot be captured gets none (logged once)."""
        self.last = self.clock()
        if self.unsupported:
            return
        try:
            state = scheduler_state(scheduler, rows=(rows[0], rows[1], latents.ndim) if rows else None)
        except CheckpointUnsupported as exc:
            self.unsupported = True
            log.warning("task %s: no checkpoints for this job: %s", self.writer.task_id, exc)
            return
        budget_seconds = None
        if self.budget is not None and self.budget.max_seconds is not None:
            budget_seconds = self.budget.clock() - self.budget.started
        checkpoint = Checkpoint(
            step=self.offset + done,
            latents=latents.detach().to("cpu", copy=True),
            scheduler=state,
            scheduler_class=type(scheduler).__name__,
            generators=[generator.get_state() for generator in generators],
            seed=self.seed,
            spec_digest=self.digest,
            budget_seconds=budget_seconds,
            stage=self.stage,
        )
        self.writer.submit(checkpoint, self.frames)
        if self.hand_off:
            self.writer.flush()

    def _restore(self, pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
        checkpoint = self.resume
        assert checkpoint is not None
        self._release_model()
        restore_scheduler(pipeline.scheduler, checkpoint.scheduler)
        for generator, state in zip(self.generators, checkpoint.generators, strict=True):
            generator.set_state(state)
        if self.budget is not None and checkpoint.budget_seconds is not None:
            self.budget.started = self.budget.clock() - checkpoint.budget_seconds
        self.last = self.clock()
        return checkpoint.latents.to(latents.device, latents.dtype)


def _as_tensor(latents: Any) -> torch.Tensor:
    """The loop's latents as one tensor: some pipelines (Z-Image) keep a list of per-image tensors."""
    return torch.stack(list(latents)) if isinstance(latents, list | tuple) else latents


def _like(latents: torch.Tensor, loop: Any) -> Any:
    """`latents` in the loop's own form (`loop`'s: a tensor, or a list of per-image tensors)."""
    return list(latents.unbind(0)) if isinstance(loop, list | tuple) else latents
