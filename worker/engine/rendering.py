"""`render(job, ...)`: run one job on a real diffusers pipeline and store what it made. No Celery here."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from pydantic import ValidationError

from producer.errors import RenderFailed, StorageError, UnsupportedSpecError
from producer.keys import image_object, manifest_object
from producer.manifest import LoraRecord, Manifest, RenderStatus, SchedulerRecord, StageRecord, Timings
from producer.spec import MAX_SEED, NEEDS, RenderSpec
from worker.engine import stages
from worker.engine.callbacks import CallbackStack, Checkpointing, build_callbacks
from worker.engine.callbacks.prompts import encode_plan
from worker.engine.callbacks.steps import sampler_steps
from worker.engine.checkpoints import CheckpointWriter, load_checkpoint
from worker.engine.job import JobContext
from worker.engine.outputs import ImageParameters, png_bytes
from worker.engine.stops import JobExpired, JobRevoked, JobStopped, TimeLimitExceeded
from worker.models import ip_adapter
from worker.models.families import ModelFamily, family_named
from worker.models.families.sd import refiner_source
from worker.models.registry import ModelRegistry
from worker.models.sampling import scheduled
from worker.storage import Storage

_VERSIONED = ("render-farm", "torch", "diffusers", "transformers")


def check_supported(spec: RenderSpec, registry: ModelRegistry) -> None:
    """The worker-side checks a producer cannot make: allowlist and what this worker runs for the model's family."""
    source = registry.source(spec.model)
    family_named(source.family).check(spec, spec.model)
    if source.family == "sdxl" and source.source is not None and spec.pipeline != "img2img":
        if refiner_source(source.source):
            raise UnsupportedSpecError(
                f"model: {spec.model!r} is an SDXL refiner, which runs img2img only; send pipeline 'img2img', or "
                f'run an SDXL base model with "refiner": {{"model": {spec.model!r}}}'
            )
    if spec.refiner is not None:
        _check_refiner(spec.refiner.model, registry)
    if spec.loras:
        registry.check_loras(spec.model, spec.loras)
    if spec.ip_adapter is not None:
        registry.check_ip_adapter(spec.model)  # its weights load on the GPU thread, with the pipeline


def _check_refiner(name: str, registry: ModelRegistry) -> None:
    if name not in registry.models:
        allowed = ", ".join(sorted(registry.models)) or "(none)"
        raise UnsupportedSpecError(
            f"refiner.model: {name!r} is not on this worker's allowlist; use one of: {allowed} (or add it to "
            "RENDER_MODELS)"
        )
    family = registry.source(name).family
    if family != "sdxl":
        raise UnsupportedSpecError(f"refiner.model: {name!r} is a {family} model; a refiner must be an SDXL model")


def read_manifest(storage: Storage, task_id: str) -> Manifest | None:
    """The task's stored manifest; None when there is none or it cannot be read as one (it is then rewritten)."""
    data = storage.get(manifest_object(task_id))
    if data is None:
        return None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError:
        return None


def render(job: JobContext | RenderSpec, *, registry: ModelRegistry, storage: Storage) -> Manifest:
    """Render one job, store its images, frames and manifest (last), and return the manifest.

    `job` is a `JobContext` (or a bare spec: a job with a new task id). A task whose stored manifest already says
    `succeeded` is returned as it is, not rendered again. A hook raising `JobRevoked` ends the job before decode and
    upload (status `revoked`); a step budget interrupts it and keeps the partial image (status `interrupted`). A
    `LeaseLost` from a hook or from `before_store` ends the job with nothing written: another worker may own it now.
    Raises `SpecError`/`ModelError` before any work, `RenderFailed` (its `manifest` the `failed` one stored) when the
    pipeline fails, and `ValueError` if the job lacks an input image the spec needs.

    The three phases are public for the worker, which runs them on different threads: `prepare` and `store` on the
    job's own, `denoise` (or `worker.engine.batching.denoise_batch`, for compatible jobs together) on its GPU thread.
    """
    job = JobContext.of(job)
    if (done := finished_manifest(storage, job.task_id)) is not None:
        return done
    prepared = prepare(job, registry, storage)
    return store(prepared, denoise(prepared, registry), storage)


def finished_manifest(storage: Storage, task_id: str) -> Manifest | None:
    """The stored manifest of `task_id` if it says `succeeded`: a redelivery of a finished job."""
    done = read_manifest(storage, task_id)
    return done if done is not None and done.status == "succeeded" else None


@dataclass
class Prepared:
    """A job checked and ready for the GPU: its callbacks built, its manifest record started."""

    job: JobContext
    record: _Record
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
        return list(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(self.pixels)))


def prepare(job: JobContext, registry: ModelRegistry, storage: Storage) -> Prepared:
    """The checks a producer cannot make, and the job's callbacks; no model is loaded here."""
    spec = job.spec
    check_supported(spec, registry)
    needed = NEEDS[spec.pipeline] | ({"ip_adapter_image"} if spec.ip_adapter else set())
    if missing := sorted(needed - set(job.inputs)):
        raise ValueError(f"{missing[0]}: not loaded; call worker.engine.inputs.load_inputs(spec, settings) first")
    family = family_named(registry.source(spec.model).family)
    record = _Record(job)
    record.family = family.name
    # A cached job resumes from no checkpoint: its steps after one would not be the uninterrupted run's.
    resume = load_checkpoint(storage, job.task_id, spec) if job.earlier_attempt and spec.cache is None else None
    if resume is not None:
        record.seed, record.resumed_from_step = resume.seed, resume.step
    stack = build_callbacks(
        spec,
        family,
        task_id=job.task_id,
        storage=storage,
        hooks=job.hooks,
        frame_threads=job.frame_threads,
        checkpointing=Checkpointing(
            job.checkpoint_seconds,
            seed=record.seed,
            resume=resume,
            drain=job.drain,
            earlier_attempt=job.earlier_attempt,
        ),
    )
    record.checkpoints = stack.checkpoints
    return Prepared(job, record, stack, family)


def load_pipeline(prepared: Sequence[Prepared], registry: ModelRegistry) -> Any:
    """The cached pipeline the jobs (all of one model and pipeline kind) run on; its load time in each record."""
    spec = prepared[0].spec
    started = time.perf_counter()
    pipe = registry.pipeline(spec.model, spec.pipeline)
    for each in prepared:
        each.record.timings.load = time.perf_counter() - started
        each.record.started_at = _now()  # the GPU took it: a job held while another denoised started now
    prepared[0].family.check_loaded(pipe, spec)
    return pipe


@contextlib.contextmanager
def job_setup(pipe: Any, prepared: Sequence[Prepared], registry: ModelRegistry) -> Iterator[None]:
    """The spec's LoRAs, IP-Adapter and sampler on `pipe` for the jobs' run, undone after; recorded in each job."""
    spec = prepared[0].spec
    with (
        registry.loras_applied(spec.model, pipe, spec.loras) as loras,
        _ip_adapter(pipe, spec, registry),
        scheduled(pipe, spec.scheduler, prepared[0].family.make_scheduler) as sampler,
        prepared[0].family.step_cache(pipe, spec.cache),
    ):
        for each in prepared:
            each.record.scheduler = SchedulerRecord(
                name=sampler.name, label=sampler.label, diffusers_class=sampler.cls, options=sampler.options
            )
            each.record.loras = [LoraRecord(name=lora.name, scale=lora.scale, sha256=lora.sha256) for lora in loras]
        yield


def denoise(prepared: Prepared, registry: ModelRegistry) -> Denoised:
    """One job's GPU phase: load (cached), sampler and LoRAs, the pipeline call with its callbacks, the decode."""
    try:
        pipe = load_pipeline([prepared], registry)
    except Exception as exc:
        return Denoised(error=exc, before_any_step=True)
    try:
        with job_setup(pipe, [prepared], registry):
            return Denoised(pixels=_run(pipe, prepared, registry))
    except JobStopped as stop:
        return Denoised(stop=stop)
    except Exception as exc:
        return Denoised(error=exc)


def store(prepared: Prepared, outcome: Denoised, storage: Storage) -> Manifest:
    """Encode and upload the job's images, wait for its frames, write its manifest (last); see `render()`."""
    try:
        return _store(prepared, outcome, storage)
    finally:  # whatever the end, no checkpoint write outlives the job's attempt (a final state deletes the checkpoint)
        if prepared.record.checkpoints is not None:
            prepared.record.checkpoints.close()


def _store(prepared: Prepared, outcome: Denoised, storage: Storage) -> Manifest:
    prepared.record.batched_with = outcome.batched_with
    if outcome.error is not None and outcome.before_any_step:
        if prepared.stack.frames:  # built by `prepare`, before the load that failed
            prepared.stack.frames.abandon()
        raise outcome.error
    if isinstance(outcome.stop, JobRevoked):
        return _revoked(prepared, outcome.stop, storage)
    if isinstance(outcome.stop, JobExpired):  # it waited for the GPU past its deadline: no step ran
        if prepared.stack.frames:
            prepared.stack.frames.abandon()
        return prepared.record.finish(storage, "expired", error=outcome.stop.error)
    _check_before_upload(prepared, outcome, storage)
    return _upload(prepared, outcome.images, storage)


def _revoked(prepared: Prepared, revoked: JobRevoked, storage: Storage) -> Manifest:
    record, frames = prepared.record, prepared.stack.frames
    if revoked.revoked_at is not None:
        record.timings.revoke_to_stop = max(0.0, time.time() - revoked.revoked_at)
    record.steps_after_revoke = revoked.steps_after_revoke
    return record.finish(storage, "revoked", frames=frames.finish() if frames else [])


def _check_before_upload(prepared: Prepared, outcome: Denoised, storage: Storage) -> None:
    """Raise what ended the job (nothing stored for a stop; a `failed` manifest for an error) or the lease check's."""
    job, frames = prepared.job, prepared.stack.frames
    try:
        if outcome.stop is not None:
            raise outcome.stop
        if outcome.error is not None:
            raise outcome.error
        if job.before_store is not None:
            job.before_store(prepared.record.steps_completed)
        return
    except TimeLimitExceeded as exc:  # a failure of the job, recorded as one
        failure: Exception = exc
    except JobStopped:  # LeaseLost: another worker may own the job now, so nothing is written
        if frames:
            frames.abandon()
        raise
    except Exception as exc:
        failure = exc
    if frames:
        frames.abandon()
    reason = f"{type(failure).__name__}: {failure}"
    error = RenderFailed(f"task {job.task_id} failed while rendering: {reason}")
    error.manifest = prepared.record.finish(storage, "failed", error=reason)
    raise error from failure


def _upload(prepared: Prepared, images: list[Image.Image], storage: Storage) -> Manifest:
    task_id, record, stack = prepared.job.task_id, prepared.record, prepared.stack
    upload_started = time.perf_counter()
    try:
        urls = [
            storage.put(
                image_object(task_id, i),
                png_bytes(image, record.parameters(record.image_seed(i)), task_id=task_id, index=i),
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
            exc.manifest = record.finish(storage, "failed", error=f"StorageError: {exc}")
        raise
    record.timings.upload = time.perf_counter() - upload_started
    record.interrupted_by = stack.budget.interrupted_by if stack.budget else None
    return record.finish(storage, "interrupted" if record.interrupted_by else "succeeded", images=urls, frames=frames)


def revoked_before_start(job: JobContext, storage: Storage) -> Manifest:
    """Record a job revoked before it started: no model loaded, no step run; an earlier attempt's checkpoint goes."""
    record = _Record(job)
    if job.earlier_attempt:
        record.checkpoints = CheckpointWriter(storage, job.task_id, exists=True)
    return record.finish(storage, "revoked")


def expired_before_start(job: JobContext, storage: Storage, expired: JobExpired) -> Manifest:
    """Record a job whose deadline passed before it started: no model loaded, no step run, no image."""
    return _Record(job).finish(storage, "expired", error=expired.error)


def failed_outside_render(job: JobContext, storage: Storage, error: str, *, steps_completed: int = 0) -> Manifest:
    """Record a job that ends `failed` while no render runs it (the recovery scan's end for a job whose workers kept
    dying): no image; `steps_completed` its last run's; the checkpoint it may have left goes."""
    record = _Record(job)
    record.steps_completed = steps_completed
    record.checkpoints = CheckpointWriter(storage, job.task_id, exists=True)
    return record.finish(storage, "failed", error=error)


def _ip_adapter(pipe: Any, spec: RenderSpec, registry: ModelRegistry) -> contextlib.AbstractContextManager[None]:
    if spec.ip_adapter is None:
        return contextlib.nullcontext()
    return ip_adapter.attached(pipe, registry.ip_adapter(spec.model), spec.ip_adapter.scale)


def _pipeline_inputs(spec: RenderSpec, inputs: dict[str, Image.Image], control_argument: str) -> dict[str, Any]:
    extra = {"ip_adapter_image": inputs["ip_adapter_image"]} if spec.ip_adapter else {}
    return {**extra, **_image_inputs(spec, inputs, control_argument)}


def _image_inputs(spec: RenderSpec, inputs: dict[str, Image.Image], control_argument: str) -> dict[str, Any]:
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
            control_argument: inputs["control_image"],
            "controlnet_conditioning_scale": spec.controlnet_conditioning_scale,
            **size,
        }
    return size


def pipeline_arguments(
    spec: RenderSpec, inputs: Mapping[str, Image.Image], seeds: Sequence[int], family: ModelFamily | None = None
) -> dict[str, Any]:
    """The keyword arguments `render()` calls the pipeline with, callbacks aside (benchmarks call it bare); `family`
    names the argument a ControlNet's image goes in (SD's `image` by default)."""
    control_argument = family.control_image_argument if family is not None else "image"
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or None,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.first_guidance_scale,
        "num_images_per_prompt": spec.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        **_pipeline_inputs(spec, dict(inputs), control_argument),
    }


def _run(pipe: Any, prepared: Prepared, registry: ModelRegistry) -> torch.Tensor:
    spec, record = prepared.spec, prepared.record
    seeds = [record.image_seed(i) for i in range(spec.num_images)]
    arguments = pipeline_arguments(spec, prepared.job.inputs, seeds, prepared.family)
    prepared.family.adjust_arguments(spec, arguments)
    if stages.stage_name(spec) is not None:
        return _run_stages(pipe, prepared, registry, arguments, seeds)
    prepared.stack.start()
    started = time.perf_counter()
    decoded = None
    try:
        with torch.inference_mode():
            pixels = _call(pipe, prepared, arguments, prepared.stack.multi, first=True)
        decoded = time.perf_counter()
    finally:
        # The step callbacks mark where denoising ended; what follows the last one is the VAE decode.
        last_step = prepared.stack.control.last_step_end or time.perf_counter()
        record.ran(pipe, started, last_step, prepared.stack.control.steps_completed, decoded)
    return pixels


def _call(
    pipe: Any, prepared: Prepared, arguments: dict[str, Any], multi: Any, *, first: bool, output_type: str = "pt"
) -> torch.Tensor:
    """One pipeline call of the job with `multi`, its callbacks (`first`: the job's first stage, which encodes an
    `a1111` prompt's spans); its images (pixels on the CPU) or, `output_type="latent"`, its latents as they are."""
    spec, record, stack = prepared.spec, prepared.record, prepared.stack
    if stack.checkpoint is not None:
        stack.checkpoint.bind(pipe, arguments["generator"])
    try:
        if first and spec.prompt_syntax == "a1111" and prepared.family.prompt_encoding:
            plan = encode_plan(pipe, prepared.family, spec)
            _, positive, negative = plan.spans[0]
            arguments.update(prepared.family.conditioning_arguments(positive, negative))
            record.prompt_tokens = plan.tokens
            if stack.prompts is not None:
                stack.prompts.plan = plan
        elif first:
            arguments.update(prepared.family.clip_skip_arguments(pipe, spec))
        prepared.family.before_call(spec, record.image_seed(0))
        output = pipe(
            **arguments,
            output_type=output_type,
            callback_on_step_end=multi,
            # Passed, not left to the callback object: Flux, SD3 img2img and others ignore its tensor_inputs.
            callback_on_step_end_tensor_inputs=list(dict.fromkeys(multi.tensor_inputs)),
        )
        images: torch.Tensor = output.images
        return images if output_type == "latent" else images.cpu()
    finally:
        stack.release()


def _run_stages(
    pipe: Any, prepared: Prepared, registry: ModelRegistry, arguments: dict[str, Any], seeds: list[int]
) -> torch.Tensor:
    """A job of two stages (`worker.engine.stages`): the first call ends with latents, the second makes the image;
    a budget spent in the first ends the job with the first stage's image. A resume into the second skips the first."""
    spec, record, stack, family = prepared.spec, prepared.record, prepared.stack, prepared.family
    loading = time.perf_counter()
    second = stages.second_pipeline(spec, registry)
    record.timings.load = (record.timings.load or 0.0) + time.perf_counter() - loading
    with scheduled(second, spec.scheduler, family.make_scheduler):
        record.stages = first_record, second_record = stages.plan(spec, pipe, second)
        stack.plan(first_record.steps_planned + second_record.steps_planned)
        stack.start()
        resume = stack.checkpoint.resume if stack.checkpoint is not None else None
        with torch.inference_mode():
            if resume is not None and resume.stage == 1:
                first_record.steps_completed = first_record.steps_planned
                image = stages.stand_in(spec, family, second)
            else:
                output_type = stages.first_output(spec)
                started, decoded = time.perf_counter(), None
                try:
                    arguments |= stages.first_stage_arguments(spec)
                    first = _call(pipe, prepared, arguments, stack.multi, first=True, output_type=output_type)
                    decoded = time.perf_counter() if output_type != "latent" else None
                finally:
                    last, done = stack.control.last_step_end, stack.control.steps_completed
                    _stage_ran(record, first_record, started, last, done, decoded)
                if stack.budget is not None and stack.budget.interrupted_by is not None:  # the first stage's image
                    if output_type == "latent":
                        handed = time.perf_counter()
                        first = family.decode(pipe, first, spec.height, spec.width)
                        first_record.decode = time.perf_counter() - handed
                        _totals(record)
                    return first
                image = stages.hand_over(spec, pipe, first)
            offset = first_record.steps_planned
            height, width = (spec.hires_size[1], spec.hires_size[0]) if spec.hires else (spec.height, spec.width)
            multi = stack.stage_callbacks(1, second_record.name, offset, (height, width))
            second_arguments = stages.second_arguments(spec, family, second, image, seeds)
            started, decoded = time.perf_counter(), None
            try:
                pixels = _call(second, prepared, second_arguments, multi, first=False)
                decoded = time.perf_counter()
            finally:
                last = stack.control.last_step_end
                _stage_ran(record, second_record, started, last, stack.control.steps_completed - offset, decoded)
    return pixels


def _stage_ran(
    record: _Record,
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
    _totals(record)


def _totals(record: _Record) -> None:
    """The job's steps and times: its stages' sums."""
    record.steps_planned = sum(each.steps_planned for each in record.stages)
    record.steps_completed = sum(each.steps_completed for each in record.stages)
    record.timings.denoise = sum(each.denoise for each in record.stages if each.denoise is not None)
    decodes = [each.decode for each in record.stages if each.decode is not None]
    record.timings.decode = sum(decodes) if decodes else None


class _Record:
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
        self.stages: list[StageRecord] = []  # a job of two stages: each one's steps and times
        self.checkpoints: CheckpointWriter | None = None
        self.started_at = _now()

    def ran(self, pipe: Any, started: float, last_step: float, steps_completed: int, decoded: float | None) -> None:
        """Record a pipeline call: steps planned and done, denoise time (to the last step) and, when the call went on
        to decode (`decoded`, when that ended), decode time."""
        if getattr(pipe, "_num_timesteps", None):
            self.steps_planned = sampler_steps(pipe)
        self.steps_completed = steps_completed
        self.timings.denoise = last_step - started
        self.timings.decode = None if decoded is None else decoded - last_step

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % (MAX_SEED + 1)

    def parameters(self, seed: int) -> ImageParameters:
        return ImageParameters(
            self.spec, seed, self.scheduler, self.loras, _versions()["render-farm"], family=self.family
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
            versions=dict(_versions()),
            error=error,
            steps_after_revoke=self.steps_after_revoke,
            batched_with=self.batched_with,
            resumed_from_step=self.resumed_from_step,
            prompt_tokens=self.prompt_tokens,
            stages=self.stages,
            started_at=self.started_at,
            finished_at=_now(),
        )
        storage.put(manifest_object(self.task_id), manifest.model_dump_json(indent=2).encode(), "application/json")
        if self.checkpoints is not None:  # a final state: nothing resumes from here
            self.checkpoints.discard()
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
