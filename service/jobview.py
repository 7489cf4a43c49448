"""A job as the API shows it: the `Job` JSON built from the producer's `TaskStatus`, its model, batch and files."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

from producer.batch import batch_tasks_key
from producer.client import TaskStatus
from producer.keys import job_key, tenant_of, unscoped
from producer.records import text
from service.deps import Service
from service.files import link

JOBS_PATH = "/v1/jobs"
_BATCH_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\.(?P<line>\d{5})(?:\.r\d+)?")


class FileLink(BaseModel):
    kind: Literal["image", "frame"]
    url: str


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str
    files: str


class Job(BaseModel):
    """A job: where it stands, its files (signed or served links) and where to follow or cancel it."""

    id: str
    tenant: str = Field(description="The tenant the job belongs to (its id says: `team-a@<id>`; `default` if bare).")
    status: str
    step: int | None
    total: int | None
    model: str | None
    batch: str | None
    error: str | None
    waiting: str | None = Field(
        default=None, description="A queued job: why no worker can start it now (no live worker serves its model)."
    )
    preview: str | None
    manifest: dict[str, Any] | None
    files: list[FileLink]
    links: JobLinks


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class FileList(BaseModel):
    files: list[FileLink]


def links(task_id: str) -> JobLinks:
    base = f"{JOBS_PATH}/{task_id}"
    return JobLinks(self=base, events=f"{base}/events", cancel=f"{base}/cancel", files=f"{base}/files")


def files(service: Service, status: TaskStatus) -> list[FileLink]:
    """The job's images and frames once final; while it renders, its newest frame."""
    if status.manifest is not None:
        found = [FileLink(kind="image", url=link(service, url)) for url in status.manifest.images]
        return found + [FileLink(kind="frame", url=link(service, url)) for url in status.manifest.frames]
    frame = getattr(status, "frame", None)
    return [FileLink(kind="frame", url=link(service, frame))] if frame else []


def jobs(service: Service, statuses: list[TaskStatus]) -> list[Job]:
    """The `Job` of each status: one pipelined round trip finds their models and batches."""
    reads = service.client.redis.pipeline(transaction=False)
    batches: list[str | None] = []
    for status in statuses:
        reads.hget(job_key(status.task_id), "queue")
        match = _BATCH_LINE.fullmatch(unscoped(status.task_id))
        batches.append(match["name"] if match else None)
        if match:
            reads.hget(batch_tasks_key(match["name"], tenant_of(status.task_id)), str(int(match["line"])))
    replies = iter(reads.execute())
    found = []
    for status, batch in zip(statuses, batches, strict=True):
        queue = next(replies)
        in_batch = batch is not None and text(next(replies) or "") == status.task_id
        found.append(_job(service, status, queue, batch if in_batch else None))
    return found


def _job(service: Service, status: TaskStatus, queue: Any, batch: str | None) -> Job:
    manifest = status.manifest
    model: str | None = None
    if manifest is not None:
        model = manifest.spec.get("model")
    elif queue:
        model = unscoped(text(queue)).removeprefix(service.settings.queue + ".")
    shown = files(service, status)
    frames = [item.url for item in shown if item.kind == "frame"]
    return Job(
        id=status.task_id,
        tenant=status.tenant,
        status=status.state,
        step=status.step,
        total=status.total,
        model=model,
        batch=batch,
        error=status.error,
        waiting=status.waiting,
        preview=frames[-1] if frames else None,
        manifest=manifest.model_dump(mode="json") if manifest is not None else None,
        files=shown,
        links=links(status.task_id),
    )
