"""What a job carries between its phases (`Prepared`, `Denoised`) and the bookkeeping of its render (`JobRecord`),
turned into its manifest at the end: seeds, steps, stages, timings, what the worker resolved (sampler, LoRAs, prompt
tokens), and the library versions."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from PIL import Image

from producer.keys import manifest_object, tenant_of
from producer.manifest import LoraRecord, Manifest, RenderStatus, SchedulerRecord, StageRecord, Timings
from producer.spec import MAX_SEED, RenderSpec
from worker.engine.callbacks import CallbackStack
from worker.engine.callbacks.steps import sampler_steps
from worker.engine.checkpoints import CheckpointWriter
from worker.engine.job import JobContext
from worker.engine.outputs import ImageParameters, pil_images
from worker.engine.stops import JobStopped
from worker.models.families import ModelFamily
from worker.storage import Storage

log = logging.getLogger(__name__)

_VERSIONED = ("render-farm", "torch", "diffusers", "transformers")


@dataclass
class Prepared:
    """A job checked and ready for the GPU: its callbacks built, its manifest record started."""

    job: JobContext
    record: JobRecord
    stack: CallbackStack
    family: ModelFamily

    @property
    def spec(self) -> RenderSpec:
        return self.job.spec

    @property
    def resuming(self) -> bool:
        """Whether the job starts from a checkpoint (it then runs alone: no batch is at its step)."""
        return self.stack.checkpoint is not None and self.stack.checkpoint.resume is not None


@dataclass
class Denoised:
    """How one job's time on the GPU ended: its images, a stop signal from a hook, or an error."""

    pixels: torch.Tensor | None = None  # the decoded images: (n, 3, h, w) floats in [0, 1], on the CPU
    stop: JobStopped | None = None
    error: Exception | None = None
    before_any_step: bool = False  # the error came before the pipeline ran (a model that will not load)
    batched_with: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        """The decoded images as PIL images, made on the thread that asks (the job's own, in `store`): turning
        pixels into 8-bit images is CPU work the GPU thread leaves to it, as it leaves the PNG encoding."""
        if self.pixels is None:
            return []
        return pil_images(self.pixels)


def stage_ran(
    record: JobRecord,
    stage: StageRecord,
    started: float,
    last_step: float | None,
    steps: int,
    decoded: float | None = None,
) -> None:
    """Record a stage's call: its steps, denoise time (to its last step), decode time; the job's totals after it."""
    last = last_step if last_step is not None and last_step >= started else time.perf_counter()
    stage.steps_completed = max(steps, 0)
    stage.denoise = last - started
    stage.decode = None if decoded is None else decoded - last
    totals(record)


def totals(record: JobRecord) -> None:
    """The job's steps and times: its stages' sums."""
    record.steps_planned = sum(each.steps_planned for each in record.stages)
    record.steps_completed = sum(each.steps_completed for each in record.stages)
    record.timings.denoise = sum(each.denoise for each in record.stages if each.denoise is not None)
    decodes = [each.decode for each in record.stages if each.decode is not None]
    record.timings.decode = sum(decodes) if decodes else None


class JobRecord:
    """The bookkeeping of one render, turned into the manifest at the end."""

    def __init__(self, job: JobContext) -> None:
        spec = self.spec = job.spec
        self.worker = job.worker or f"{socket.gethostname()}:{os.getpid()}"
        self.task_id = job.task_id
        self.attempt = job.attempt
        self.seed = spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED)
        self.timings = Timings(queue_wait=job.queue_wait)
        self.steps_planned = spec.denoising_steps
        self.steps_completed = 0
        self.interrupted_by: Any = None
        self.steps_after_revoke: int | None = None
        self.scheduler: SchedulerRecord | None = None
        self.family: str | None = None
        self.loras: list[LoraRecord] = []
        self.batched_with: list[str] = []
        self.resumed_from_step: int | None = None
        self.prompt_tokens: dict[str, int] | None = None
        self.warnings: list[str] = []
        self.stages: list[StageRecord] = []  # a job of two stages: each one's steps and times
        self.checkpoints: CheckpointWriter | None = None
        self.started_at = now()

    def ran(self, pipe: Any, started: float, last_step: float, steps_completed: int, decoded: float | None) -> None:
        """Record a pipeline call: steps planned and done, denoise time (to the last step) and, when the call went on
        to decode (`decoded`, when that ended), decode time."""
        if getattr(pipe, "_num_timesteps", None):
            self.steps_planned = sampler_steps(pipe)
        self.steps_completed = steps_completed
        self.timings.denoise = last_step - started
        self.timings.decode = None if decoded is None else decoded - last_step

    def plain_prompt(self, tokens: dict[str, tuple[int, int]]) -> None:
        """Record what each text encoder sees of a `plain` prompt, and a warning for each that cuts it."""
        self.prompt_tokens = {name: seen for name, (_, seen) in tokens.items()} or None
        for name, (count, seen) in tokens.items():
            if seen < count:
                warning = (
                    f"prompt: {name} saw {seen} of its {count} tokens (a plain prompt is cut as diffusers cuts it); "
                    'send "prompt_syntax": "a1111" for the whole prompt'
                )
                log.warning("task %s: %s", self.task_id, warning)
                self.warnings.append(warning)

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % (MAX_SEED + 1)

    def parameters(self, seed: int) -> ImageParameters:
        return ImageParameters(
            self.spec, seed, self.scheduler, self.loras, versions()["render-farm"], family=self.family
        )

    def finish(
        self,
        storage: Storage,
        status: RenderStatus,
        *,
        images: list[str] | None = None,
        frames: list[str] | None = None,
        error: str | None = None,
    ) -> Manifest:
        manifest = Manifest(
            task_id=self.task_id,
            tenant=tenant_of(self.task_id),
            status=status,
            steps_planned=self.steps_planned,
            steps_completed=self.steps_completed,
            interrupted_by=self.interrupted_by,
            images=images or [],
            frames=frames or [],
            spec=self.spec.model_dump(mode="json"),
            seed=self.seed,
            family=self.family,
            scheduler=self.scheduler,
            clip_skip=self.spec.clip_skip,
            loras=self.loras,
            timings=self.timings,
            worker=self.worker,
            attempt=self.attempt,
            versions=dict(versions()),
            error=error,
            steps_after_revoke=self.steps_after_revoke,
            batched_with=self.batched_with,
            resumed_from_step=self.resumed_from_step,
            prompt_tokens=self.prompt_tokens,
            warnings=self.warnings,
            stages=self.stages,
            started_at=self.started_at,
            finished_at=now(),
        )
        storage.put(manifest_object(self.task_id), manifest.model_dump_json(indent=2).encode(), "application/json")
        if self.checkpoints is not None:  # a final state: nothing resumes from here
            self.checkpoints.discard()
        return manifest


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@cache  # installed versions do not change under a running process; each manifest needs them
def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found
