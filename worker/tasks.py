"""The Celery task: thin. Validate, check revocation, take the lease, run the job's phases, report, return.

The task runs on one of the worker's job threads (Celery's thread pool): it prepares the job, waits for the GPU
thread to denoise it (alone or batched, `worker.gpu`) while reporting its progress, then stores it, so that
one job's encode, upload and manifest overlap the next job's denoising.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from celery import Task, states
from celery.exceptions import Ignore
from redis import Redis

from producer.errors import ModelLoadError, RenderFailed, StorageError
from producer.keys import check_task_id, manifest_key, model_queue
from producer.manifest import Manifest
from producer.records import PROGRESS_STATE, Progress, TaskMessage
from producer.spec import RenderSpec
from worker import metrics
from worker.drain import Drain
from worker.fleet import JobAdvert
from worker.gpu import Arrival, Deadline, GpuRunner, ProgressBox
from worker.inputs import load_inputs
from worker.job import JobContext
from worker.jobcontrol import Lease, ProgressReport, RevocationCheck, RevocationWatch, control_client, patient_client
from worker.models.registry import ModelRegistry
from worker.rendering import finished_manifest, prepare, revoked_before_start, store
from worker.settings import WorkerSettings
from worker.stops import HandedOff, JobRevoked, LeaseLost
from worker.storage import Storage, open_storage
from worker.webhooks import WebhookSender

log = logging.getLogger(__name__)


@dataclass
class ProcessState:
    """What one worker process keeps between jobs: the loaded models above all, and the GPU thread."""

    pid: int
    settings: WorkerSettings
    registry: ModelRegistry
    storage: Storage
    redis: Redis  # task-level reads and writes: redis-py's retries are welcome here
    control: Redis  # the per-step check: fast failure, never a stalled step
    owner: str
    webhooks: WebhookSender  # its own thread: a slow receiver never delays the next job
    advert: JobAdvert
    gpu: GpuRunner
    revocations: RevocationWatch  # its own thread: pushed revocations of the jobs in hand, as flags the steps read
    withdrawn: dict[str, str] = field(default_factory=dict)  # model -> why it failed to load here: its jobs go on
    drain: Drain = field(default_factory=Drain)  # begun on SIGTERM (`worker.celery_app`)


_STATE_LOCK = threading.Lock()  # the first jobs in hand arrive together, on several threads


def process_state(task: Task) -> ProcessState:
    # Built lazily in the process that renders, on its first job: CUDA and sockets do not survive a fork.
    with _STATE_LOCK:
        state: ProcessState | None = getattr(task.app, "render_state", None)
        if state is None or state.pid != os.getpid():
            state = _build_state(task)
            task.app.render_state = state
        return state


def _build_state(task: Task) -> ProcessState:
    settings: WorkerSettings = task.app.render_settings
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    metrics.serve(settings.metrics_port)
    redis_client = patient_client(settings.redis_url, **settings.sentinel)
    control = control_client(settings.redis_url, **settings.sentinel)
    registry = ModelRegistry.from_settings(settings)
    advert = JobAdvert(control, task.request.hostname, registry)
    webhooks = WebhookSender(
        redis_client,
        secret=settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
        allowed_hosts=settings.webhook_hosts,
        max_attempts=settings.webhook_attempts,
        backoff=settings.webhook_backoff_seconds,
        timeout=settings.webhook_timeout,
    )
    webhooks.start()
    owner = f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"
    return ProcessState(
        pid=os.getpid(),
        settings=settings,
        registry=registry,
        storage=open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, retry_seconds=settings.storage_retry_seconds
        ),
        redis=redis_client,
        control=control,
        owner=owner,
        webhooks=webhooks,
        advert=advert,
        gpu=GpuRunner(
            registry,
            max_batch=settings.max_batch,
            on_call=lambda ids: advert.job_started(ids[0]),
            on_idle=advert.job_ended,
            deliveries=getattr(task.app, "render_deliveries", None),
        ),
        revocations=RevocationWatch(control, owner, poll=settings.revocation_poll_interval).start(),
    )


def run_render(task: Task, spec_json: Any) -> dict[str, Any]:
    """Body of the `render.run` task. Returns the manifest as JSON; a revoked job ends in state REVOKED."""
    state = process_state(task)
    with state.gpu.arriving() as arrival:  # a call being formed may wait for this job's checks (GATHER_SECONDS)
        return _run(task, state, spec_json, arrival)


def _run(task: Task, state: ProcessState, spec_json: Any, arrival: Arrival) -> dict[str, Any]:
    spec = RenderSpec.parse(spec_json if isinstance(spec_json, str | bytes | dict) else repr(spec_json))
    task_id: str = check_task_id(task.request.id)
    message = TaskMessage.received(task.request, spec.model_dump_json(), queue=task.app.conf.task_default_queue)
    job = JobContext(
        spec,
        task_id,
        attempt=message.attempt,
        queue_wait=max(0.0, time.time() - message.submitted_at) if message.submitted_at else None,
        worker=state.owner,
        frame_threads=state.settings.frame_upload_threads,
        checkpoint_seconds=state.settings.checkpoint_seconds,
        drain=state.drain,
    )
    deadline = Deadline(state.settings.task_time_limit)  # counted from here, as Celery's time limit was

    if (done := finished_manifest(state.storage, task_id)) is not None:
        return done.model_dump(mode="json")  # a redelivery of a finished job
    revocation = state.revocations.watch(task_id)  # before the lease, which tells `revoke` where to push
    try:
        return _leased(task, state, message, job, revocation, deadline, arrival)
    finally:
        state.revocations.forget(revocation)


def _leased(
    task: Task,
    state: ProcessState,
    message: TaskMessage,
    job: JobContext,
    revocation: RevocationCheck,
    deadline: Deadline,
    arrival: Arrival,
) -> dict[str, Any]:
    spec, task_id = job.spec, job.task_id
    lease = Lease(state.redis, task_id, state.settings.lease_ttl, state.owner, renew_client=state.control)
    if not lease.acquire(message.running(state.owner)):
        log.warning("task %s is being rendered by %s; this delivery is dropped", task_id, lease.holder())
        raise Ignore()
    box = ProgressBox()
    job.hooks = [  # in this order: a job whose lease is lost or that is revoked reports no more progress
        lease,
        revocation,
        ProgressReport(box.post, interval=state.settings.progress_interval),
        deadline,
        metrics.StepTimer(spec.model),
    ]
    job.before_store = lease.check

    try:
        if revocation.read(state.redis):  # revoked while queued (or before the lease named this worker)
            manifest = revoked_before_start(job, state.storage)
        elif spec.model in state.withdrawn:  # it failed to load here: another worker serving it takes the job
            raise ModelLoadError(state.withdrawn[spec.model])
        else:
            job.inputs = load_inputs(spec, state.settings)  # a bad input image fails here, before any GPU work
            prepared = prepare(job, state.registry, state.storage)
            outcome = state.gpu.run(
                prepared,
                deadline=deadline.at,
                box=box,
                report=lambda step, total: _progress(task, step, total, state.advert),
                started=lambda: _started(task),
                skip=lambda: JobRevoked(0, revoked_at=revocation.revoked_at) if revocation.is_revoked() else None,
                arrival=arrival,
            )
            manifest = store(prepared, outcome, state.storage)
            control = prepared.stack.control
            metrics.record_hooks(spec.model, control.hook_seconds, control.hook_calls)
        _publish(state, manifest)  # before the lease goes: a scanner never finds the job unleased and unfinished
    except HandedOff as handed:
        _hand_off(task, message, lease, handed)
        raise Ignore() from None
    except ModelLoadError as exc:
        if _hand_on(task, state, message, spec.model, lease, exc):
            raise Ignore() from None
        _notify(state, spec, task_id, None, exc)  # it failed to load on RENDER_MAX_ATTEMPTS workers: a failure
        raise
    except LeaseLost:
        # Another worker may be rendering this job now: this delivery leaves no trace (no state, no manifest).
        log.error("task %s: lease lost; stopped and dropped this delivery", task_id)
        raise Ignore() from None
    except (RenderFailed, StorageError) as exc:
        metrics.JOBS.labels(status="failed").inc()
        if exc.manifest is not None:
            _publish(state, exc.manifest)
        _notify(state, spec, task_id, exc.manifest, exc)
        raise
    except Exception as exc:  # a model that will not load, a bad input: still a final state the webhook hears of
        _notify(state, spec, task_id, None, exc)
        raise
    finally:
        lease.release()
    metrics.record(manifest)
    if manifest.status == "revoked":
        _finish_revoked(task, state, manifest, spec)
    _notify(state, spec, task_id, manifest)
    return manifest.model_dump(mode="json")


def _hand_off(task: Task, message: TaskMessage, lease: Lease, handed: HandedOff) -> None:
    """Put a job this draining worker will not finish back on its queue as its next attempt (same id, queue and
    priority), which resumes from the checkpoint it just stored."""
    _requeue(task, message.again(), lease)
    log.warning(
        "task %s handed back to its queue at step %d (the worker is shutting down); attempt %d resumes it",
        message.task_id,
        handed.steps_completed,
        message.attempt + 1,
    )


def _hand_on(
    task: Task, state: ProcessState, message: TaskMessage, model: str, lease: Lease, error: ModelLoadError
) -> bool:
    """The job's `model` failed to load on this worker: withdraw the model here (this worker's advert, its queue) and
    put the job back on its queue for a worker that can load it. False, with nothing done to the job, once this
    was its `RENDER_MAX_ATTEMPTS`th such attempt: the job then fails with the cause."""
    failures = message.load_failures + 1
    if model not in state.withdrawn:
        _withdraw(task, state, model, error)
    if failures >= state.settings.max_attempts:
        error.args = (f"{error} (on {failures} attempts; RENDER_MAX_ATTEMPTS is {state.settings.max_attempts})",)
        return False
    _requeue(task, message.again(load_failures=failures), lease)
    log.warning(
        "task %s handed on to another worker (attempt %d of %d): %s",
        message.task_id,
        failures,
        state.settings.max_attempts,
        error,
    )
    return True


def _requeue(task: Task, message: TaskMessage, lease: Lease) -> None:
    """Send `message` (the job's next attempt). The lease goes first, so the next worker can take it at once; the
    result is forgotten, so `render status` shows it queued. A crash between the two leaves the job unleased and
    unacknowledged, which the recovery scanner puts back."""
    lease.release()
    task.backend.forget(message.task_id)
    message.send(task.app)


def _withdraw(task: Task, state: ProcessState, model: str, error: ModelLoadError) -> None:
    """Stop serving `model` in this process: no more of its jobs are taken, and the fleet is told at once."""
    state.withdrawn[model] = str(error)
    queue = model_queue(state.settings.queue, model)
    log.error("%s; this worker stops serving it (its queue %s) until it restarts", error, queue)
    heartbeat = getattr(task.app, "heartbeat", None)
    if heartbeat is not None:
        heartbeat.withdraw_model(model, queue)
    if task.request.hostname:
        task.app.control.cancel_consumer(queue, destination=[task.request.hostname], reply=False)


def _started(task: Task) -> None:
    """The GPU took the job: until then it showed `queued`, though a job thread held it (Celery's STARTED)."""
    task.update_state(state=states.STARTED, meta={"pid": os.getpid(), "hostname": task.request.hostname})


def _progress(task: Task, step: int, total: int, advert: JobAdvert) -> None:
    advert.progress(step, total)  # never raises
    task.update_state(state=PROGRESS_STATE, meta=Progress(step, total).meta())
    task.send_event("task-progress", step=step, total=total)


def _publish(state: ProcessState, manifest: Manifest) -> None:
    """Put the final manifest where clients without storage access can read it."""
    state.redis.set(manifest_key(manifest.task_id), manifest.model_dump_json(), ex=state.settings.result_ttl)


def _notify(
    state: ProcessState, spec: RenderSpec, task_id: str, manifest: Manifest | None, error: BaseException | None = None
) -> None:
    """Queue the job's webhook, if it has one: its manifest, or for a failure that left none, what is known."""
    if spec.webhook is None:
        return
    if manifest is not None:
        body = manifest.model_dump_json().encode()
    else:
        failure = {"task_id": task_id, "status": "failed", "error": f"{type(error).__name__}: {error}"}
        body = json.dumps({**failure, "spec": spec.model_dump(mode="json")}).encode()
    state.webhooks.enqueue(task_id, spec.webhook, body)


def _finish_revoked(task: Task, state: ProcessState, manifest: Manifest, spec: RenderSpec) -> None:
    """The job's REVOKED state and event, its webhook; its manifest is already published."""
    _notify(state, spec, manifest.task_id, manifest)
    reason = f"revoked after {manifest.steps_completed} of {manifest.steps_planned} steps"
    task.backend.mark_as_revoked(task.request.id, reason, request=task.request)
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()  # the state is REVOKED; do not let Celery overwrite it with SUCCESS
