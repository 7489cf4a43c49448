"""The Celery task: a thin converter. What Celery delivered becomes a spec and a `TaskMessage`, the job runs in the
Celery-free `JobRunner` (`worker.process.runner`), and what the runner needs from the queue (`Delivery`) is done here,
in Celery's terms: task states and events, sending the job's next attempt, cancelling a consumer.

The task runs on one of the worker's job threads (Celery's thread pool); the process's services are built when the
worker starts (`worker.celery_app`'s bootstep).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore

from producer.records import PROGRESS_STATE, Progress, TaskMessage
from producer.spec import RenderSpec
from worker.process.fleet import Heartbeat
from worker.process.runner import JobRunner


class TaskDelivery:
    """The job's `Delivery` through its Celery task: what `JobRunner` tells the queue, as Celery states and
    events."""

    def __init__(self, task: Task, heartbeat: Heartbeat | None) -> None:
        self.task = task
        self.heartbeat = heartbeat

    def started(self) -> None:
        # Celery's STARTED: set when the GPU takes the job, not when a job thread takes it.
        self.task.update_state(state=states.STARTED, meta={"pid": os.getpid(), "hostname": self.task.request.hostname})

    def progress(self, step: int, total: int, frame: str | None = None) -> None:
        self.task.update_state(state=PROGRESS_STATE, meta=Progress(step, total, frame).meta())
        self.task.send_event("task-progress", step=step, total=total)

    def requeue(self, message: TaskMessage) -> None:
        # The result is forgotten, so `render status` shows the job queued until its next attempt starts.
        self.task.backend.forget(message.task_id)
        message.send(self.task.app)

    def withdraw(self, model: str, queue: str) -> None:
        # The fleet is told at once (this worker's advert), and this worker stops consuming the queue.
        if self.heartbeat is not None:
            self.heartbeat.withdraw_model(model, queue)
        if self.task.request.hostname:
            self.task.app.control.cancel_consumer(queue, destination=[self.task.request.hostname], reply=False)

    def revoked(self, reason: str) -> None:
        self.task.backend.mark_as_revoked(self.task.request.id, reason, request=self.task.request)
        self.task.send_event("task-revoked", terminated=False, signum=None, expired=False)


def run_render(task: Task, runner: JobRunner, heartbeat: Heartbeat | None, spec_json: Any) -> dict[str, Any]:
    """Body of the `render.run` task. Returns the manifest as JSON; a job that leaves no result (revoked: its state is
    REVOKED; handed back or on; held elsewhere) ends the task with `Ignore`, so Celery writes no state over it."""
    with runner.services.gpu.arriving() as arrival:  # a call being formed may wait for this job's checks
        spec = RenderSpec.parse(spec_json if isinstance(spec_json, str | bytes | dict) else repr(spec_json))
        message = TaskMessage.received(task.request, spec.model_dump_json(), queue=task.app.conf.task_default_queue)
        result = runner.run(spec, message, TaskDelivery(task, heartbeat), arrival)
    if result is None:
        raise Ignore()
    return dict(result)
