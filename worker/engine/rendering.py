"""`render(job, ...)`: run one job on a real diffusers pipeline and store what it made. No Celery here."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image
from pydantic import ValidationError

from producer.errors import RenderFailed, StorageError, UnsupportedSpecError
from producer.keys import image_object, manifest_object
from producer.manifest import LoraRecord, Manifest, SchedulerRecord
from producer.spec import NEEDS, RenderSpec
from worker.engine.callbacks import Checkpointing, build_callbacks
from worker.engine.calls import pipeline_arguments as pipeline_arguments  # for the batches and benchmarks
from worker.engine.calls import run
from worker.engine.checkpoints import CheckpointWriter, load_checkpoint
from worker.engine.job import JobContext
from worker.engine.outputs import png_bytes
from worker.engine.record import Denoised as Denoised  # the phases' types, where the worker has always found them
from worker.engine.record import JobRecord, now
from worker.engine.record import Prepared as Prepared
from worker.engine.stops import JobExpired, JobRevoked, JobStopped, TimeLimitExceeded
from worker.models import ip_adapter
from worker.models.families import family_named
from worker.models.families.sd import refiner_source
from worker.models.registry import ModelRegistry
from worker.models.sampling import scheduled
from worker.storage import Storage


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


def prepare(job: JobContext, registry: ModelRegistry, storage: Storage) -> Prepared:
    """The checks a producer cannot make, and the job's callbacks; no model is loaded here."""
    spec = job.spec
    check_supported(spec, registry)
    needed = NEEDS[spec.pipeline] | ({"ip_adapter_image"} if spec.ip_adapter else set())
    if missing := sorted(needed - set(job.inputs)):
        raise ValueError(f"{missing[0]}: not loaded; call worker.engine.inputs.load_inputs(spec, settings) first")
    family = family_named(registry.source(spec.model).family)
    record = JobRecord(job)
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
        each.record.started_at = now()  # the GPU took it: a job held while another denoised started now
    prepared[0].family.check_loaded(pipe, spec)
    for each in prepared:
        if each.spec.prompt_syntax == "plain":
            each.record.plain_prompt(each.family.plain_prompt_tokens(pipe, each.spec.prompt))
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
            return Denoised(pixels=run(pipe, prepared, registry))
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
    record = JobRecord(job)
    if job.earlier_attempt:
        record.checkpoints = CheckpointWriter(storage, job.task_id, exists=True)
    return record.finish(storage, "revoked")


def expired_before_start(job: JobContext, storage: Storage, expired: JobExpired) -> Manifest:
    """Record a job whose deadline passed before it started: no model loaded, no step run, no image."""
    return JobRecord(job).finish(storage, "expired", error=expired.error)


def failed_outside_render(job: JobContext, storage: Storage, error: str, *, steps_completed: int = 0) -> Manifest:
    """Record a job that ends `failed` while no render runs it (the recovery scan's end for a job whose workers kept
    dying): no image; `steps_completed` its last run's; the checkpoint it may have left goes."""
    record = JobRecord(job)
    record.steps_completed = steps_completed
    record.checkpoints = CheckpointWriter(storage, job.task_id, exists=True)
    return record.finish(storage, "failed", error=error)


def _ip_adapter(pipe: Any, spec: RenderSpec, registry: ModelRegistry) -> contextlib.AbstractContextManager[None]:
    if spec.ip_adapter is None:
        return contextlib.nullcontext()
    return ip_adapter.attached(pipe, registry.ip_adapter(spec.model), spec.ip_adapter.scale)
