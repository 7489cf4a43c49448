"""Cross-job micro-batching: compatible jobs in hand share one pipeline call, each keeping its own rows.

`shared_call_key` is the one definition of compatible: jobs with equal keys can share every UNet call. It holds
what diffusers applies to a whole call (model and pipeline kind, size, steps, sampler, the guidance scale and
CFG cutoff, LoRAs and their scales, clip skip, whether a negative prompt is given: SDXL encodes a missing one
as zeros, an empty one as text); each job keeps its prompt, negative prompt, seeds, `num_images`, frames and
step budget. Only text2img without an IP-Adapter batches; every other job runs alone.

Inside the call each job owns a run of rows (one per image). After every model call, each job's hooks run on
its own: a revoke (or a lost lease) drops its rows at once, with no decode. At each step's end its budget and
frames run on its rows; a job whose budget is spent leaves with its partial latents, decoded at once, as it
would be alone. Dropping rows slices everything that carries them: the latents, the prompt embeddings (both
halves while guidance is on), SDXL's pooled embeddings and time ids, the generators (ancestral and SDE
samplers draw per-row noise from them), and the scheduler's per-row history (multistep solvers' model
outputs, Heun's first-order state).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.spec import CfgCutoff, Frames, RenderSpec, StepBudget
from worker.engine.callbacks.build import release_cutoff
from worker.engine.callbacks.frames import FramesCallback
from worker.engine.callbacks.steps import SamplerStepView, ends_a_step, steps_over
from worker.engine.rendering import Denoised, Prepared, denoise, job_setup, load_pipeline, pipeline_arguments
from worker.engine.stops import HandedOff, JobStopped
from worker.models.registry import ModelRegistry


def shared_call_key(spec: RenderSpec) -> Hashable | None:
    """What a job must share with others to run in one pipeline call with them; None: it always runs alone."""
    if spec.pipeline != "text2img" or spec.ip_adapter is not None or spec.cache is not None:
        return None  # a step cache decides for the whole call: a job's rows would not be its image alone
    if any(not isinstance(callback, (CfgCutoff, StepBudget, Frames)) for callback in spec.callbacks):
        return None  # a callback the batch does not run per job
    if spec.prompt_syntax == "a1111" or spec.guidance is not None:
        return None  # encoded prompts (their spans) and guidance curves are one job's, in a call of its own
    if spec.hires is not None or spec.refiner is not None:
        return None  # a second stage is a second call, the job's own
    cutoff = spec.callback(CfgCutoff)
    return (
        spec.model,
        spec.pipeline,
        spec.width,
        spec.height,
        spec.num_inference_steps,
        spec.scheduler,
        spec.guidance_scale,
        spec.true_cfg_scale,
        (cutoff.step_ratio, cutoff.step_index) if cutoff is not None else None,
        tuple((lora.name, lora.scale) for lora in spec.loras),
        spec.clip_skip,
        bool(spec.negative_prompt),
    )


def denoise_batch(prepared: Sequence[Prepared], registry: ModelRegistry) -> list[Denoised]:
    """The GPU phase of jobs with one `shared_call_key`, as one pipeline call; one outcome per job, in order."""
    if len(prepared) == 1:
        return [denoise(prepared[0], registry)]
    try:
        pipe = load_pipeline(prepared, registry)
    except Exception as exc:
        return [Denoised(error=exc, before_any_step=True) for _ in prepared]
    if not prepared[0].family.batchable(pipe):
        return [denoise(each, registry) for each in prepared]
    batch = _Batch(pipe, prepared)
    try:
        with job_setup(pipe, prepared, registry):
            batch.run()
    except Exception as exc:  # the call itself failed: every job still in it fails with the cause
        for member in list(batch.active):  # `leave` takes each out of `active`
            batch.leave(member, Denoised(error=exc))
    ids = [each.job.task_id for each in prepared]
    for job_id, outcome in zip(ids, batch.outcomes, strict=True):
        assert outcome is not None
        outcome.batched_with = [other for other in ids if other != job_id]
    return [outcome for outcome in batch.outcomes if outcome is not None]


class _AllLeft(Exception):
    """No row is left in the call: end it before the decode."""


@dataclass
class _Member:
    index: int  # the job's place in the batch
    prepared: Prepared
    rows: int  # its images
    start: int = 0  # its first row in the call's latents

    @property
    def stack(self) -> Any:
        return self.prepared.stack


class _Batch:
    def __init__(self, pipe: Any, prepared: Sequence[Prepared]) -> None:
        self.pipe = pipe
        self.prepared = list(prepared)
        self.active = [_Member(i, each, each.spec.num_images) for i, each in enumerate(prepared)]
        self._restart()
        self.outcomes: list[Denoised | None] = [None] * len(prepared)
        spec = prepared[0].spec
        cutoff = spec.callback(CfgCutoff)
        self.family = prepared[0].family
        self.cutoff = self.family.cfg_cutoff(cutoff, spec.pipeline) if cutoff is not None else None
        self.frames = {
            member.index: FramesCallback(member.stack.frames, member.prepared.family, (spec.height, spec.width))
            for member in self.active
            if member.stack.frames is not None
        }
        self.tensor_inputs = self.family.batch_tensor_inputs(pipe)
        self.generators: list[torch.Generator] = []
        self.started = time.perf_counter()

    def run(self) -> None:
        spec = self.prepared[0].spec
        seeds = [m.prepared.record.image_seed(i) for m in self.active for i in range(m.rows)]
        arguments = pipeline_arguments(spec, {}, seeds)
        arguments["prompt"] = [m.prepared.spec.prompt for m in self.active for _ in range(m.rows)]
        negatives = [m.prepared.spec.negative_prompt for m in self.active for _ in range(m.rows)]
        arguments["negative_prompt"] = negatives if spec.negative_prompt else None
        arguments["num_images_per_prompt"] = 1
        self.family.adjust_arguments(spec, arguments)
        self.generators = arguments["generator"]  # the list the loop hands the scheduler: rows leave it in place
        for member in self.active:
            member.stack.start()
            if member.stack.checkpoint is not None:
                member.stack.checkpoint.bind_batch()
        self.started = time.perf_counter()
        try:
            with torch.inference_mode():
                arguments.update(self.family.clip_skip_arguments(self.pipe, spec, arguments["prompt"]))
                self.family.before_call(spec, seeds[0])
                output = self.pipe(
                    **arguments,
                    output_type="pt",
                    callback_on_step_end=self,
                    callback_on_step_end_tensor_inputs=self.tensor_inputs,
                )
        except _AllLeft:
            return
        finally:
            for each in self.prepared:
                each.stack.release()
            release_cutoff(self.cutoff)
        pixels = output.images.cpu()
        for member in list(self.active):
            self.leave(member, Denoised(pixels=pixels[member.start : member.start + member.rows]))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        spec = self.prepared[0].spec
        return self.family.decode(self.pipe, latents, spec.height, spec.width)

    def _restart(self) -> None:
        """Number the active jobs' rows from 0, in order (after rows left the call)."""
        start = 0
        for member in self.active:
            member.start = start
            start += member.rows

    def leave(self, member: _Member, outcome: Denoised) -> None:
        """`member` is out of the call: its outcome and its record (steps done, denoise to its last step, decode)."""
        control = member.stack.control
        now = time.perf_counter()
        decoded = now if outcome.pixels is not None else None
        member.prepared.record.ran(
            self.pipe, self.started, control.last_step_end or now, control.steps_completed, decoded
        )
        self.active.remove(member)
        self.outcomes[member.index] = outcome

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> Any:
        view = SamplerStepView(pipeline)
        completed = steps_over(step_index + 1, pipeline)
        ends = ends_a_step(pipeline, step_index)
        stopped: dict[int, Denoised] = {}
        for member in self.active:
            try:
                member.stack.control.on_model_call(view, completed if ends else completed - 1)
            except JobStopped as stop:
                pipeline._interrupt = False  # the hook marks the whole pipeline; only this job's rows stop
                stopped[member.index] = Denoised(stop=stop)
        spent: list[_Member] = []
        if ends:
            if self.cutoff is not None:
                callback_kwargs = self.cutoff(view, completed - 1, timestep, callback_kwargs)
            spent = self._step_end(view, completed - 1, timestep, callback_kwargs, stopped)
        self._drop(pipeline, callback_kwargs, stopped, spent)
        return callback_kwargs

    def _step_end(
        self, view: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any], stopped: dict[int, Denoised]
    ) -> list[_Member]:
        """Each job's budget, frames and checkpoint on its own rows; the jobs whose budget is spent. A job handed
        off (its worker drains) checkpoints its rows and joins `stopped`."""
        spent = []
        total = callback_kwargs["latents"].shape[0]
        for member in self.active:
            mine = slice(member.start, member.start + member.rows)
            rows = callback_kwargs["latents"][mine]
            if member.index in stopped:
                continue
            if member.stack.budget is not None and member.stack.budget.spent(step + 1, view.num_timesteps):
                spent.append(member)
            if (frames := self.frames.get(member.index)) is not None:
                frames.callback_fn(view, step, timestep, {"latents": rows})
            checkpoint = member.stack.checkpoint
            if checkpoint is None or member in spent:
                continue
            if checkpoint.step_end(
                view.scheduler, step + 1, view.num_timesteps, rows, self.generators[mine], rows=(mine, total)
            ):
                stopped[member.index] = Denoised(stop=HandedOff(step + 1))
        return spent

    def _drop(
        self, pipeline: Any, callback_kwargs: dict[str, Any], stopped: dict[int, Denoised], spent: list[_Member]
    ) -> None:
        if not stopped and not spent:
            return
        latents = callback_kwargs["latents"]
        keep: list[int] = []
        leaving: list[tuple[_Member, slice]] = []
        for member in self.active:
            rows = slice(member.start, member.start + member.rows)
            if member.index in stopped or member in spent:
                leaving.append((member, rows))
            else:
                keep.extend(range(rows.start, rows.stop))
        for member, rows in leaving:
            outcome = stopped.get(member.index) or Denoised(pixels=self._decode(latents[rows].clone()))
            self.leave(member, outcome)
        if not keep:
            raise _AllLeft()
        if not self.family.can_drop_rows(pipeline):
            return  # the rows that left stay in the call, unused: not every per-row tensor is a callback tensor
        index = torch.tensor(keep, device=latents.device)
        rows_before = latents.shape[0]
        guided = torch.cat([index, index + rows_before]) if pipeline.do_classifier_free_guidance else index
        self.family.drop_rows(callback_kwargs, index, guided)
        self.generators[:] = [self.generators[row] for row in keep]
        _slice_scheduler_rows(pipeline.scheduler, rows_before, latents.ndim, index)
        self._restart()


def _slice_scheduler_rows(scheduler: Any, rows: int, ndim: int, index: torch.Tensor) -> None:
    """Keep `index` rows of every per-row tensor the scheduler holds (alone or in a history list)."""

    def per_row(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim == ndim and value.shape[0] == rows

    for name, value in list(vars(scheduler).items()):
        if per_row(value):
            setattr(scheduler, name, value[index])
        elif isinstance(value, list) and any(per_row(item) for item in value):
            setattr(scheduler, name, [item[index] if per_row(item) else item for item in value])
