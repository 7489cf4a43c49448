"""The Celery task: thin. Validate, check revocation, take the lease, call `render()`, report, return."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
from celery import Task
from celery.exceptions import Ignore
from redis import Redis

from producer.errors import RenderFailed, StorageError
from producer.keys import ATTEMPT_HEADER, SUBMITTED_AT_HEADER, check_task_id, manifest_key, revoked_key
from producer.manifest import Manifest
from producer.spec import RenderSpec
from producer.webhooks import parse_allowed_hosts
from worker import metrics
from worker.fleet import JobAdvert
from worker.inputs import load_inputs
from worker.jobcontrol import Lease, RedisJobControl, control_client, patient_client
from worker.models.registry import ModelRegistry
from worker.render import read_manifest, render, revoked_before_start
from worker.settings import WorkerSettings
from worker.stops import LeaseLost
from worker.storage import Storage, open_storage
from worker.webhooks import WebhookSender

log = logging.getLogger(__name__)


@dataclass
class ProcessState:
    """What one worker process keeps between jobs: the loaded models above all."""

    pid: int
    settings: WorkerSettings
    registry: ModelRegistry
    storage: Storage
    redis: Redis  # task-level reads and writes: redis-py's retries are welcome here
    control: Redis  # the per-step check: fast failure, never a stalled step
    owner: str
    webhooks: WebhookSender  # its own thread: a slow receiver never delays the next job


def process_state(task: Task) -> ProcessState:
    # Built lazily in the process that renders (a prefork child), never before the fork: CUDA and
    # sockets do not survive fork.
    state: ProcessState | None = getattr(task.app, "render_state", None)
    if state is None or state.pid != os.getpid():
        settings: WorkerSettings = task.app.render_settings
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        metrics.serve(settings.metrics_port)
        redis_client = patient_client(settings.redis_url)
        state = ProcessState(
            pid=os.getpid(),
            settings=settings,
            registry=ModelRegistry.from_settings(settings),
            storage=open_storage(
                settings.storage_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                retry_seconds=settings.storage_retry_seconds,
            ),
            redis=redis_client,
            control=control_client(settings.redis_url),
            owner=f"{task.request.hostname or socket.gethostname()}:{os.getpid()}",
            webhooks=WebhookSender(
                redis_client,
                secret=settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
                allowed_hosts=parse_allowed_hosts(settings.webhook_hosts),
                max_attempts=settings.webhook_attempts,
                backoff=settings.webhook_backoff_seconds,
                timeout=settings.webhook_timeout,
            ),
        )
        state.webhooks.start()
        task.app.render_state = state
    return state


def run_render(task: Task, spec_json: Any) -> dict[str, Any]:
    """Body of the `render.run` task. Returns the manifest as JSON; a revoked job ends in state REVOKED."""
    spec = RenderSpec.parse(spec_json if isinstance(spec_json, str | bytes | dict) else repr(spec_json))
    task_id: str = check_task_id(task.request.id)
    state = process_state(task)
    attempt = int(task.request.get(ATTEMPT_HEADER) or 1)
    submitted = task.request.get(SUBMITTED_AT_HEADER)
    queue_wait = max(0.0, time.time() - float(submitted)) if submitted else None

    if (done := read_manifest(state.storage, task_id)) is not None and done.status == "succeeded":
        return done.model_dump(mode="json")  # a redelivery of a finished job
    if state.redis.exists(revoked_key(task_id)):
        _finish_revoked(
            task,
            state,
            revoked_before_start(spec, task_id, state.storage, attempt, queue_wait, state.owner),
            spec,
        )

    lease = Lease(state.redis, task_id, state.settings.lease_ttl, state.owner, renew_client=state.control)
    record = {
        "spec": spec.model_dump_json(),
        "queue": _queue(task),
        "priority": (task.request.delivery_info or {}).get("priority"),
        "attempt": attempt,
        "submitted_at": submitted,
        "worker": state.owner,
    }
    if not lease.acquire(record):
        log.warning("task %s is being rendered by %s; this delivery is dropped", task_id, lease.holder())
        raise Ignore()
    advert = JobAdvert(state.control, task.request.hostname, state.registry)
    advert.job_started(task_id)
    control = RedisJobControl(
        state.control,
        task_id,
        lambda step, total: _progress(task, step, total, advert),
        progress_interval=state.settings.progress_interval,
        lease=lease,
    )

    try:
        inputs = load_inputs(spec, state.settings)  # a bad input image fails here, before any GPU work
        manifest = render(
            spec,
            registry=state.registry,
            storage=state.storage,
            task_id=task_id,
            hooks=[control, metrics.StepTimer(spec.model)],
            attempt=attempt,
            queue_wait=queue_wait,
            frame_threads=state.settings.frame_upload_threads,
            worker=state.owner,
            inputs=inputs,
            before_store=lease.check,
        )
    except LeaseLost:
        # Another worker may be rendering this job now: this delivery leaves no trace (no state, no manifest).
        log.error("task %s: lease lost; stopped and dropped this delivery", task_id)
        raise Ignore() from None
    except (RenderFailed, StorageError) as exc:
        metrics.JOBS.labels(status="failed").inc()
        failed = None
        with contextlib.suppress(StorageError):  # storage may be the very thing that failed
            if (failed := read_manifest(state.storage, task_id)) is not None:
                _publish(state, failed)
        _notify(state, spec, task_id, failed, exc)
        raise
    except Exception as exc:  # a model that will not load, a bad input: still a final state the webhook hears of
        _notify(state, spec, task_id, None, exc)
        raise
    finally:
        lease.release()
        advert.job_ended()
    _publish(state, manifest)
    metrics.record(manifest)
    if manifest.status == "revoked":
        _finish_revoked(task, state, manifest, spec)
    _notify(state, spec, task_id, manifest)
    return manifest.model_dump(mode="json")


def _queue(task: Task) -> str | None:
    info = task.request.delivery_info or {}
    queue = info.get("routing_key") or task.app.conf.task_default_queue
    return str(queue) if queue else None


def _progress(task: Task, step: int, total: int, advert: JobAdvert) -> None:
    advert.progress(step, total)  # never raises
    task.update_state(state="PROGRESS", meta={"step": step, "total": total})
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
    _publish(state, manifest)
    _notify(state, spec, manifest.task_id, manifest)
    reason = f"revoked after {manifest.steps_completed} of {manifest.steps_planned} steps"
    task.backend.mark_as_revoked(task.request.id, reason, request=task.request)
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()  # the state is REVOKED; do not let Celery overwrite it with SUCCESS
