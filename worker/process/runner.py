"""The job runner: one delivered job from its message to its final state, with no Celery in it.

The Celery task (`worker.process.tasks`) is a thin converter around `JobRunner.run`: it parses what Celery
delivered into a `TaskMessage` and gives the runner a `Delivery`, the few things a job needs from the queue that
brought it (report its start and progress, put it back, stop taking a model's queue, mark it revoked). A test drives
the runner with its own `Delivery` and no broker (tests/integration/test_runner.py).

The runner takes the job's lease, prepares the job, waits for the GPU thread to denoise it (alone or batched,
`worker.process.gpu`) while reporting its progress, then stores it, so that one job's encode, upload and manifest
overlap the next job's denoising.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from producer.errors import ModelLoadError, RenderFailed, StorageError
from producer.keys import check_task_id, manifest_key, model_queue, tenant_of
from producer.manifest import Manifest
from producer.records import TaskMessage
from producer.spec import RenderSpec
from worker import metrics
from worker.engine.inputs import load_inputs
from worker.engine.job import JobContext
from worker.engine.rendering import expired_before_start, finished_manifest, prepare, revoked_before_start, store
from worker.engine.stops import HandedOff, JobExpired, JobRevoked, JobStopped, LeaseLost
from worker.process.fairshare import capped, free_gpu
from worker.process.gpu import Arrival, Deadline, ProgressBox
from worker.process.jobcontrol import Lease, ProgressReport, RevocationCheck
from worker.process.services import Services

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """What a job needs from the queue that delivered it (the Celery task's `TaskDelivery` in a worker)."""

    def started(self) -> None:
        """The GPU took the job (until then it showed `queued`, though a job thread held it)."""

    def progress(self, step: int, total: int, frame: str | None = None) -> None:
        """The job completed `step` of `total` steps; `frame` is the URL of its newest stored step frame, if any."""

    def requeue(self, message: TaskMessage) -> None:
        """Put `message`, the job's next attempt, on its queue (the job's lease is already released)."""

    def withdraw(self, model: str, queue: str) -> None:
        """Stop taking `queue`, the queue of `model`, which failed to load in this process."""

    def revoked(self, reason: str) -> None:
        """The job ended revoked (its manifest is already published): record that final state."""


def expiry(
    spec: RenderSpec, message: TaskMessage, clock: Callable[[], float] = time.time
) -> Callable[[], JobExpired | None]:
    """The check of the job's `deadline_seconds`: `JobExpired` once submit time + deadline has passed, else None.

    Only a job no worker has started can expire: its first attempt, or one that follows only workers that could
    not load its model. A job handed back or recovered after it started is never expired."""
    limit = spec.deadline_seconds
    if limit is None or message.submitted_at is None or message.attempt - 1 > message.load_failures:
        return lambda: None
    at = message.submitted_at + limit
    return lambda: JobExpired(limit) if clock() >= at else None


class JobRunner:
    """Runs the jobs this process is delivered, on the process's `Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def run(self, spec: RenderSpec, message: TaskMessage, delivery: Delivery, arrival: Arrival | None = None) -> Any:
        """Run the job and return its manifest as JSON; None when this delivery leaves no result (someone else holds
        the job, it was handed back or on, its lease was lost, or it ended revoked, which `delivery.revoked` was
        told). Spec, model, load, render and storage errors propagate, after the job's webhook is queued.

        `arrival` is what the job's thread holds from taking the job until it queues it (`GpuRunner.arriving`).
        """
        services = self.services
        task_id = check_task_id(message.task_id)
        job = JobContext(
            spec,
            task_id,
            attempt=message.attempt,
            queue_wait=max(0.0, time.time() - message.submitted_at) if message.submitted_at else None,
            worker=services.owner,
            frame_threads=services.settings.frame_upload_threads,
            checkpoint_seconds=services.settings.checkpoint_seconds,
            drain=services.drain,
        )
        deadline = Deadline(services.settings.task_time_limit)  # counted from here, as Celery's time limit was

        try:
            if (done := finished_manifest(services.storage, task_id)) is not None:
                return done.model_dump(mode="json")  # a redelivery of a finished job
            revocation = services.revocations.watch(task_id)  # before the lease, which tells `revoke` where to push
            try:
                return self._leased(message, job, revocation, deadline, delivery, arrival)
            finally:
                services.revocations.forget(revocation)
        finally:
            if tenant_of(task_id) in capped(services.settings.tenants):  # its job took a slot of its tenant's
                free_gpu(services.redis, task_id)

    def _leased(
        self,
        message: TaskMessage,
        job: JobContext,
        revocation: RevocationCheck,
        deadline: Deadline,
        delivery: Delivery,
        arrival: Arrival | None,
    ) -> Any:
        services = self.services
        spec, task_id = job.spec, job.task_id
        lease = Lease(
            services.redis, task_id, services.settings.lease_ttl, services.owner, renew_client=services.control
        )
        if not lease.acquire(message.running(services.owner)):
            log.warning("task %s is being rendered by %s; this delivery is dropped", task_id, lease.holder())
            return None
        box = ProgressBox()
        job.hooks = [  # in this order: a job whose lease is lost or that is revoked reports no more progress
            lease,
            revocation,
            ProgressReport(box.post, interval=services.settings.progress_interval),
            deadline,
            metrics.StepTimer(spec.model),
        ]
        job.before_store = lease.check

        try:
            manifest = self._render(job, revocation, expiry(spec, message), deadline, box, delivery, arrival)
            self._publish(manifest)  # before the lease goes: a scanner never finds the job unleased and unfinished
        except HandedOff as handed:
            self._requeue(delivery, message.again(), lease)
            log.warning(
                "task %s handed back to its queue at step %d (the worker is shutting down); attempt %d resumes it",
                task_id,
                handed.steps_completed,
                message.attempt + 1,
            )
            return None
        except ModelLoadError as exc:
            if self._hand_on(delivery, message, spec.model, lease, exc):
                return None
            self._notify(spec, task_id, None, exc)  # it failed to load on RENDER_MAX_ATTEMPTS workers: a failure
            raise
        except LeaseLost:
            # Another worker may be rendering this job now: this delivery leaves no trace (no state, no manifest).
            log.error("task %s: lease lost; stopped and dropped this delivery", task_id)
            return None
        except (RenderFailed, StorageError) as exc:
            metrics.failed(task_id)
            if exc.manifest is not None:
                self._publish(exc.manifest)
            self._notify(spec, task_id, exc.manifest, exc)
            raise
        except Exception as exc:  # a model that will not load, a bad input: still a final state the webhook hears of
            self._notify(spec, task_id, None, exc)
            raise
        finally:
            lease.release()
        metrics.record(manifest)
        self._notify(spec, task_id, manifest)
        if manifest.status == "revoked":
            delivery.revoked(f"revoked after {manifest.steps_completed} of {manifest.steps_planned} steps")
            return None  # the state is REVOKED: no result overwrites it
        return manifest.model_dump(mode="json")

    def _render(
        self,
        job: JobContext,
        revocation: RevocationCheck,
        expired: Callable[[], JobExpired | None],
        deadline: Deadline,
        box: ProgressBox,
        delivery: Delivery,
        arrival: Arrival | None,
    ) -> Manifest:
        """The leased job's manifest: revoked or expired before it started, or prepared, denoised on the GPU thread
        and stored (revoked or expired while it waited for the GPU: recorded so, with no step run)."""
        services, spec = self.services, job.spec
        if revocation.read(services.redis):  # revoked while queued (or before the lease named this worker)
            return revoked_before_start(job, services.storage)
        if (stop := expired()) is not None:  # its deadline passed while it was queued
            return expired_before_start(job, services.storage, stop)
        if spec.model in services.withdrawn:  # it failed to load here: another worker serving it takes the job
            raise ModelLoadError(services.withdrawn[spec.model])

        job.inputs = load_inputs(spec, services.settings)  # a bad input image fails here, before any GPU work
        prepared = prepare(job, services.registry, services.storage)
        frames = prepared.stack.frames

        def progress(step: int, total: int) -> None:
            services.advert.progress(step, total)  # never raises
            delivery.progress(step, total, frames.newest if frames else None)

        def skip() -> JobStopped | None:  # when the GPU takes the job: a revoke, then the deadline, stop it there
            return JobRevoked(0, revoked_at=revocation.revoked_at) if revocation.is_revoked() else expired()

        outcome = services.gpu.run(
            prepared,
            deadline=deadline.at,
            box=box,
            report=progress,
            started=delivery.started,
            skip=skip,
            arrival=arrival,
        )
        manifest = store(prepared, outcome, services.storage)
        control = prepared.stack.control
        metrics.record_hooks(spec.model, control.hook_seconds, control.hook_calls)
        return manifest

    def _hand_on(
        self, delivery: Delivery, message: TaskMessage, model: str, lease: Lease, error: ModelLoadError
    ) -> bool:
        """The job's `model` failed to load on this worker: withdraw the model here (this worker's advert, its
        queue) and put the job back on its queue for a worker that can load it. False, with nothing done to the job,
        once this was its `RENDER_MAX_ATTEMPTS`th such attempt: the job then fails with the cause."""
        services = self.services
        failures = message.load_failures + 1
        if model not in services.withdrawn:
            services.withdrawn[model] = str(error)
            queue = model_queue(services.settings.queue, model)
            log.error("%s; this worker stops serving it (its queue %s) until it restarts", error, queue)
            delivery.withdraw(model, queue)
        if failures >= services.settings.max_attempts:
            error.args = (f"{error} (on {failures} attempts; RENDER_MAX_ATTEMPTS is {services.settings.max_attempts})",)
            return False
        self._requeue(delivery, message.again(load_failures=failures), lease)
        log.warning(
            "task %s handed on to another worker (attempt %d of %d): %s",
            message.task_id,
            failures,
            services.settings.max_attempts,
            error,
        )
        return True

    @staticmethod
    def _requeue(delivery: Delivery, message: TaskMessage, lease: Lease) -> None:
        """Send `message` (the job's next attempt). The lease goes first, so the next worker can take it at once. A
        crash between the two leaves the job unleased and unacknowledged, which the recovery scanner puts back."""
        lease.release()
        delivery.requeue(message)

    def _publish(self, manifest: Manifest) -> None:
        """Put the final manifest where clients without storage access can read it."""
        self.services.redis.set(
            manifest_key(manifest.task_id), manifest.model_dump_json(), ex=self.services.settings.result_ttl
        )

    def _notify(
        self, spec: RenderSpec, task_id: str, manifest: Manifest | None, error: BaseException | None = None
    ) -> None:
        """Queue the job's webhook, if it has one: its manifest, or for a failure that left none, what is known."""
        if spec.webhook is None:
            return
        if manifest is not None:
            body = manifest.model_dump_json().encode()
        else:
            failure = {"task_id": task_id, "status": "failed", "error": f"{type(error).__name__}: {error}"}
            body = json.dumps({**failure, "spec": spec.model_dump(mode="json")}).encode()
        self.services.webhooks.enqueue(task_id, spec.webhook, body)
