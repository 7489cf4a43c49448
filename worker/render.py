"""`render(spec, ...)`: run one job on a real diffusers pipeline and store what it made. No Celery here."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError

from producer.errors import RenderFailed, StorageError
from producer.keys import check_task_id, image_object, manifest_object
from producer.manifest import LoraRecord, Manifest, RenderStatus, SchedulerRecord, Timings
from producer.spec import MAX_SEED, NEEDS, RenderSpec
from worker.callbacks import CallbackStack, StepHook, build_callbacks
from worker.callbacks.steps import sampler_steps
from worker.models import ip_adapter
from worker.models.registry import ModelRegistry
from worker.models.sampling import check_clip_skip, clip_skip_arguments, scheduled
from worker.outputs import ImageParameters, png_bytes
from worker.stops import JobRevoked, LeaseLost
from worker.storage import Storage

_VERSIONED = ("render-farm", "torch", "diffusers", "transformers")


def check_supported(spec: RenderSpec, registry: ModelRegistry) -> None:
    """The worker-side checks a producer cannot make: allowlist and what this worker runs."""
    registry.source(spec.model)
    if spec.loras:
        registry.check_loras(spec.model, spec.loras)
    if spec.ip_adapter is not None:
        registry.ip_adapter(spec.model)


def read_manifest(storage: Storage, task_id: str) -> Manifest | None:
    """The task's stored manifest; None when there is none or it cannot be read as one (it is then rewritten)."""
    data = storage.get(manifest_object(task_id))
    if data is None:
        return None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError:
        return None


def render(
    spec: RenderSpec,
    *,
    registry: ModelRegistry,
    storage: Storage,
    task_id: str | None = None,
    hooks: Sequence[StepHook] = (),
    attempt: int = 1,
    queue_wait: float | None = None,
    frame_threads: int = 2,
    worker: str | None = None,
    inputs: Mapping[str, Image.Image] | None = None,
    before_store: Callable[[int], None] | None = None,
) -> Manifest:
    """Render `spec`, store images, frames and the manifest (last), and return the manifest.

    A task whose stored manifest already says `succeeded` is returned as it is, not rendered
    again. A hook raising `JobRevoked` ends the job before decode and upload (status `revoked`);
    a step budget interrupts it and keeps the partial image (status `interrupted`).
    `inputs` are the spec's images, already checked (`worker.inputs.load_inputs`). `before_store(steps)` runs
    after decode, before the first upload; a `LeaseLost` from it or from a hook ends the job with nothing
    written, because another worker may own it now.
    Raises `SpecError`/`ModelError` before any work, `RenderFailed` after writing a `failed` manifest, and
    `ValueError` if `inputs` lacks an image the spec needs (a caller that skipped `load_inputs`).
    """
    task_id = uuid.uuid4().hex if task_id is None else check_task_id(task_id)  # '' is refused, not replaced
    if (done := read_manifest(storage, task_id)) is not None and done.status == "succeeded":
        return done
    check_supported(spec, registry)
    inputs = dict(inputs or {})
    needed = NEEDS[spec.pipeline] | ({"ip_adapter_image"} if spec.ip_adapter else set())
    if missing := sorted(needed - set(inputs)):
        raise ValueError(f"{missing[0]}: not loaded; call worker.inputs.load_inputs(spec, settings) first")
    job = _Job(spec, task_id, attempt, queue_wait, worker)

    started = time.perf_counter()
    pipe = registry.pipeline(spec.model, spec.pipeline)
    job.timings.load = time.perf_counter() - started
    check_clip_skip(pipe, spec)
    family = registry.source(spec.model).family
    stack = build_callbacks(spec, family, task_id=task_id, storage=storage, hooks=hooks, frame_threads=frame_threads)
    try:
        with (
            registry.loras_applied(spec.model, pipe, spec.loras) as loras,
            _ip_adapter(pipe, spec, registry),
            scheduled(pipe, spec.scheduler) as sampler,
        ):
            job.scheduler = SchedulerRecord(
                name=sampler.name, label=sampler.label, diffusers_class=sampler.cls, options=sampler.options
            )
            job.loras = [LoraRecord(name=lora.name, scale=lora.scale, sha256=lora.sha256) for lora in loras]
            images = _run(pipe, spec, job, stack, inputs)
        if before_store is not None:
            before_store(job.steps_completed)
    except LeaseLost:
        if stack.frames:
            stack.frames.abandon()
        raise
    except JobRevoked as revoked:
        if revoked.revoked_at is not None:
            job.timings.revoke_to_stop = max(0.0, time.time() - revoked.revoked_at)
        job.steps_after_revoke = revoked.steps_after_revoke
        return job.finish(storage, "revoked", frames=stack.frames.finish() if stack.frames else [])
    except Exception as exc:
        if stack.frames:
            stack.frames.abandon()
        job.finish(storage, "failed", error=f"{type(exc).__name__}: {exc}")
        raise RenderFailed(f"task {task_id} failed while rendering: {type(exc).__name__}: {exc}") from exc

    upload_started = time.perf_counter()
    try:
        urls = [
            storage.put(
                image_object(task_id, i),
                png_bytes(image, job.parameters(job.image_seed(i)), task_id=task_id, index=i),
                "image/png",
            )
            for i, image in enumerate(images)
        ]
        frames = stack.frames.finish() if stack.frames else []
    except StorageError as exc:
        # Nothing may say `succeeded` unless every object is stored; record the failure if storage still takes it.
        if stack.frames:
            stack.frames.abandon()
        with contextlib.suppress(StorageError):
            job.finish(storage, "failed", error=f"StorageError: {exc}")
        raise
    job.timings.upload = time.perf_counter() - upload_started
    job.interrupted_by = stack.budget.interrupted_by if stack.budget else None
    return job.finish(storage, "interrupted" if job.interrupted_by else "succeeded", images=urls, frames=frames)


def revoked_before_start(
    spec: RenderSpec,
    task_id: str,
    storage: Storage,
    attempt: int = 1,
    queue_wait: float | None = None,
    worker: str | None = None,
) -> Manifest:
    """Record a job revoked before it started: no model loaded, no step run."""
    return _Job(spec, task_id, attempt, queue_wait, worker).finish(storage, "revoked")


def _ip_adapter(pipe: Any, spec: RenderSpec, registry: ModelRegistry) -> contextlib.AbstractContextManager[None]:
    if spec.ip_adapter is None:
        return contextlib.nullcontext()
    return ip_adapter.attached(pipe, registry.ip_adapter(spec.model), spec.ip_adapter.scale)


def _pipeline_inputs(spec: RenderSpec, inputs: dict[str, Image.Image]) -> dict[str, Any]:
    extra = {"ip_adapter_image": inputs["ip_adapter_image"]} if spec.ip_adapter else {}
    return {**extra, **_image_inputs(spec, inputs)}


def _image_inputs(spec: RenderSpec, inputs: dict[str, Image.Image]) -> dict[str, Any]:
    if spec.pipeline == "img2img":
        return {"image": inputs["image"], "strength": spec.strength}
    if spec.pipeline == "inpaint":
        return {
            "image": inputs["image"],
            "mask_image": inputs["mask_image"],
            "strength": spec.strength,
            "width": spec.width,
            "height": spec.height,
        }
    size = {"width": spec.width, "height": spec.height}
    if spec.pipeline == "controlnet":
        return {
            "image": inputs["control_image"],
            "controlnet_conditioning_scale": spec.controlnet_conditioning_scale,
            **size,
        }
    return size


def pipeline_arguments(spec: RenderSpec, inputs: Mapping[str, Image.Image], seeds: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments `render()` calls the pipeline with, callbacks aside (benchmarks call it bare)."""
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or None,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "num_images_per_prompt": spec.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        **_pipeline_inputs(spec, dict(inputs)),
    }


def _run(pipe: Any, spec: RenderSpec, job: _Job, stack: CallbackStack, inputs: dict[str, Image.Image]) -> list[Any]:
    arguments = pipeline_arguments(spec, inputs, [job.image_seed(i) for i in range(spec.num_images)])
    stack.start()
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            arguments.update(clip_skip_arguments(pipe, spec))
            output = pipe(**arguments, callback_on_step_end=stack.multi)
    finally:
        # The step callbacks mark where denoising ended; what follows the last one is the VAE decode.
        finished = time.perf_counter()
        last_step = stack.control.last_step_end or finished
        if getattr(pipe, "_num_timesteps", None):
            job.steps_planned = sampler_steps(pipe)
        job.steps_completed = stack.control.steps_completed
        job.timings.denoise = last_step - started
    job.timings.decode = finished - last_step
    return list(output.images)


class _Job:
    """The bookkeeping of one render, turned into the manifest at the end."""

    def __init__(
        self, spec: RenderSpec, task_id: str, attempt: int, queue_wait: float | None, worker: str | None = None
    ) -> None:
        self.spec = spec
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.task_id = task_id
        self.attempt = attempt
        self.seed = spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED)
        self.timings = Timings(queue_wait=queue_wait)
        self.steps_planned = spec.denoising_steps
        self.steps_completed = 0
        self.interrupted_by: Any = None
        self.steps_after_revoke: int | None = None
        self.scheduler: SchedulerRecord | None = None
        self.loras: list[LoraRecord] = []
        self.started_at = _now()

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % (MAX_SEED + 1)

    def parameters(self, seed: int) -> ImageParameters:
        return ImageParameters(self.spec, seed, self.scheduler, self.loras, _versions()["render-farm"])

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
            status=status,
            steps_planned=self.steps_planned,
            steps_completed=self.steps_completed,
            interrupted_by=self.interrupted_by,
            images=images or [],
            frames=frames or [],
            spec=self.spec.model_dump(mode="json"),
            seed=self.seed,
            scheduler=self.scheduler,
            clip_skip=self.spec.clip_skip,
            loras=self.loras,
            timings=self.timings,
            worker=self.worker,
            attempt=self.attempt,
            versions=dict(_versions()),
            error=error,
            steps_after_revoke=self.steps_after_revoke,
            started_at=self.started_at,
            finished_at=_now(),
        )
        storage.put(manifest_object(self.task_id), manifest.model_dump_json(indent=2).encode(), "application/json")
        return manifest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@cache  # installed versions do not change under a running process; each manifest needs them
def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found
