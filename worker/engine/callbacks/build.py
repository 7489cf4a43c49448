"""Turn a spec's `callbacks` list into one `MultiPipelineCallbacks` that counts sampler steps, in a fixed order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from producer.spec import CfgCutoff, Frames, IpAdapterScaleCutoff, RenderSpec, StepBudget
from worker.engine.callbacks.budget import StepBudgetCallback
from worker.engine.callbacks.checkpoint import CheckpointCallback
from worker.engine.callbacks.control import StepControlCallback
from worker.engine.callbacks.drain import DrainHook
from worker.engine.callbacks.frames import FramesCallback, FrameWriter
from worker.engine.callbacks.prompts import GuidanceCurveCallback, PromptScheduleCallback, switch_steps
from worker.engine.callbacks.steps import SamplerStepCallbacks
from worker.engine.checkpoints import Checkpoint, CheckpointWriter, spec_digest
from worker.engine.drain import Drain
from worker.hooks import StepHook
from worker.models.families import ModelFamily
from worker.models.families.guidance import ip_adapter_scale_cutoff_callback
from worker.storage import Storage


@dataclass
class CallbackStack:
    """The job's callbacks; `multi` is what the pipeline gets (a `MultiPipelineCallbacks` counting sampler steps)."""

    control: StepControlCallback
    budget: StepBudgetCallback | None
    frames: FrameWriter | None
    multi: SamplerStepCallbacks
    checkpoint: CheckpointCallback | None = None
    checkpoints: CheckpointWriter | None = None  # stores (and at the end deletes) the job's checkpoint
    cutoff: Any = None  # the CFG cutoff, whose `release()` (where it has one) undoes what it did to the model
    prompts: PromptScheduleCallback | None = None  # a prompt schedule's, bound to its encoded spans by the render
    frames_callback: FramesCallback | None = None  # the first stage's (a later stage gets one of its own)

    def plan(self, total: int) -> None:
        """The job runs stages of `total` steps in all: progress and the step budget count over all of them."""
        self.control.planned = total
        if self.budget is not None:
            self.budget.total = total

    def stage_callbacks(self, index: int, label: str, offset: int, size: tuple[int, int]) -> SamplerStepCallbacks:
        """The callbacks of stage `index` (`label`: hires, refiner) of a job, after `offset` steps of the ones before
        it: the job-wide ones (control, budget, checkpoint) go on counting; frames are the stage's (`label`-step-NNN,
        a preview of its `size` (height, width) latents); cutoffs, prompt schedules and guidance curves are the first
        stage's only."""
        self.control.offset = offset
        chain: list[Any] = []
        if self.budget is not None:
            self.budget.offset = offset
            chain.append(self.budget)
        if self.frames is not None and self.frames_callback is not None:
            frames = FramesCallback(self.frames, self.frames_callback.family, size)
            frames.stage, frames.offset = label, offset
            frames.skip_through = self.frames_callback.skip_through
            chain.append(frames)
        if self.checkpoint is not None:
            self.checkpoint.enter_stage(index, offset)
            chain.append(self.checkpoint)
        return SamplerStepCallbacks(self.control, chain)

    def start(self) -> None:
        self.control.start()
        if self.budget is not None:
            self.budget.start()

    def release(self) -> None:
        """After the pipeline call, however it ended: the checkpoint's and the cutoff's hold on the model goes."""
        if self.checkpoint is not None:
            self.checkpoint.release()
        release_cutoff(self.cutoff)


def release_cutoff(cutoff: Any) -> None:
    """Undo what a CFG cutoff did to the model (`ConditionalHalfCutoff`); nothing for the callbacks that trim."""
    if cutoff is not None and hasattr(cutoff, "release"):
        cutoff.release()


@dataclass(frozen=True)
class Checkpointing:
    """How a job checkpoints: every `seconds` of denoising (0: never on a timer), recording the job's `seed`; from
    `resume` it starts; with `drain` (the worker's SIGTERM hand-off) it checkpoints and leaves when its worker drains.
    `earlier_attempt`: an earlier delivery may have stored a checkpoint, which goes once this one ends."""

    seconds: float = 0.0
    seed: int = 0
    resume: Checkpoint | None = None
    drain: Drain | None = None
    earlier_attempt: bool = False


def build_callbacks(
    spec: RenderSpec,
    family: ModelFamily,
    *,
    task_id: str,
    storage: Storage,
    hooks: Sequence[StepHook] = (),
    frame_threads: int = 2,
    checkpointing: Checkpointing = Checkpointing(),
) -> CallbackStack:
    """The job's callbacks: `hooks` run after every model call, then the spec's callbacks at each step's end, then its
    checkpoints (`checkpointing`); frames are encoded and stored on `frame_threads` threads."""
    resume, drain = checkpointing.resume, checkpointing.drain
    # Control first, so a revoked job stops before anything else happens at that step; frames last,
    # so a frame shows the latents every other callback has settled on.
    control = StepControlCallback(task_id, hooks)
    checkpoints = CheckpointWriter(storage, task_id, exists=True) if checkpointing.earlier_attempt else None
    chain: list[Any] = []
    cutoff_callback = None
    budget = None
    if (budget_spec := spec.callback(StepBudget)) is not None:
        budget = StepBudgetCallback(budget_spec)
        chain.append(budget)
    if (cutoff := spec.callback(CfgCutoff)) is not None:
        cutoff_callback = family.cfg_cutoff(cutoff, spec.pipeline, ip_adapter=spec.ip_adapter is not None)
        chain.append(cutoff_callback)
    if (ip_cutoff := spec.callback(IpAdapterScaleCutoff)) is not None:
        chain.append(ip_adapter_scale_cutoff_callback(ip_cutoff))
    # After the cutoff: a switch at the cutoff's step hands over only the rows the cutoff left.
    prompts = PromptScheduleCallback(family, spec.num_images) if switch_steps(spec) else None
    if prompts is not None:
        chain.append(prompts)
    if spec.guidance is not None:
        chain.append(GuidanceCurveCallback(spec.guidance))
    writer = frames_callback = None
    if (frames := spec.callback(Frames)) is not None:
        writer = FrameWriter(storage, task_id, frames, threads=frame_threads)
        frames_callback = FramesCallback(writer, family, (spec.height, spec.width))
        if resume is not None:
            writer.adopt(resume.frames)
            frames_callback.skip_through = resume.step
        chain.append(frames_callback)
    checkpoint = None
    # A cached job writes no checkpoint: a resume from it would not make the uninterrupted image. Handed off, it
    # starts again from its first step (DrainHook without a checkpoint).
    if spec.cache is None and (checkpointing.seconds > 0 or resume is not None or drain is not None):
        checkpoints = checkpoints or CheckpointWriter(storage, task_id)
        digest = spec_digest(spec)
        checkpoint = CheckpointCallback(
            checkpoints,
            checkpointing.seconds,
            seed=checkpointing.seed,
            digest=digest,
            resume=resume,
            budget=budget,
            frames=writer,
            family=family,
        )
        chain.append(checkpoint)
    if drain is not None:
        control.hooks = (*control.hooks, DrainHook(drain, checkpoint))
    multi = SamplerStepCallbacks(control, chain)
    return CallbackStack(
        control, budget, writer, multi, checkpoint, checkpoints, cutoff_callback, prompts, frames_callback
    )
