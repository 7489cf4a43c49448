"""Sampler steps, not model calls: what a job's callbacks count, whatever the scheduler.

diffusers calls `callback_on_step_end` once per iteration of its loop, and for most schedulers an
iteration is one step. Heun-type schedulers (order 2) run two iterations per step, each a UNet
call (the first a predictor, the second its correction), and one for the last step, where they
fall back to Euler: 20 steps are 39 calls, and `pipeline.num_timesteps` says 39. A job's
`num_inference_steps`, cutoffs, budget and frames mean sampler steps, as A1111 and ComfyUI count
them, so the job's callbacks run once per step with the step's index, on a view of the pipeline
whose `num_timesteps` counts steps. Revocation, leases and progress still run at every model call:
a revoke never waits for a second UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers.callbacks import MultiPipelineCallbacks

from worker.engine.callbacks.control import StepControlCallback


def steps_over(calls: int, pipeline: Any) -> int:
    """Sampler steps begun within `calls` loop iterations: the calls over the scheduler's calls per step."""
    order = max(int(getattr(pipeline.scheduler, "order", 1)), 1)
    return -(-calls // order)


def sampler_steps(pipeline: Any) -> int:
    """The sampler steps the pipeline's loop runs (its iterations, over the scheduler's model calls per step)."""
    return steps_over(int(pipeline.num_timesteps), pipeline)


def ends_a_step(pipeline: Any, call_index: int) -> bool:
    """Whether loop iteration `call_index` completed a sampler step (a Heun predictor call does not)."""
    return call_index == pipeline.num_timesteps - 1 or bool(getattr(pipeline.scheduler, "state_in_first_order", True))


class SamplerStepView:
    """The pipeline as the job's callbacks see it: `num_timesteps` counts sampler steps; all else is the pipeline."""

    __slots__ = ("_pipeline",)

    def __init__(self, pipeline: Any) -> None:
        object.__setattr__(self, "_pipeline", pipeline)

    @property
    def num_timesteps(self) -> int:
        return sampler_steps(self._pipeline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __setattr__(self, name: str, value: Any) -> None:  # `_interrupt`, `_guidance_scale`, ... go to the pipeline
        setattr(self._pipeline, name, value)


class SamplerStepCallbacks(MultiPipelineCallbacks):
    """`MultiPipelineCallbacks` whose callbacks run at the end of each sampler step, with its index.

    `control` (revocation, lease, progress) runs at every model call, first.
    """

    def __init__(self, control: StepControlCallback, callbacks: Sequence[Any]) -> None:
        super().__init__([control, *callbacks])
        self.control = control
        self.per_step = list(callbacks)

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        view = SamplerStepView(pipeline)
        completed = steps_over(step_index + 1, pipeline)  # steps begun by the end of this call (Heun: ceil(calls / 2))
        ends = ends_a_step(pipeline, step_index)
        self.control.on_model_call(view, completed if ends else completed - 1)
        if ends:
            for callback in self.per_step:
                callback_kwargs = callback(view, completed - 1, timestep, callback_kwargs)
        return callback_kwargs
