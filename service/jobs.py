"""`/v1/jobs`: submit (with `Idempotency-Key` and `Prefer: wait=N`), read, list, cancel, and a job's files."""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, Any, cast

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from producer.client import TaskStatus
from producer.errors import SpecError, WaitTimeout
from producer.keys import Priority, check_task_id, idempotency_key
from producer.spec import RenderSpec
from service.deps import Reader, Service, Writer
from service.errors import ApiError, ErrorResponse
from service.jobview import JOBS_PATH, FileList, Job, JobList, files, jobs

MAX_WAIT = 60.0
"""The longest `Prefer: wait=N` honoured, in seconds: a request held longer would meet proxies' timeouts."""
_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+(?:\.\d+)?)")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 429, 503)
}
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "description": "a render spec (`render schema`)"}}
        },
    }
}

router = APIRouter(prefix=JOBS_PATH, tags=["jobs"], responses=_ERRORS)


def job_of(service: Service, task_id: str) -> Job:
    """The job `task_id`; `ApiError` 404 when no job of that id is known."""
    try:
        check_task_id(task_id)
    except SpecError:
        raise ApiError(404, "not_found", f"no job {task_id!r} is known", field="id") from None
    status = service.client.status(task_id)
    if status.state == "unknown":
        raise ApiError(404, "not_found", f"no job {task_id!r} is known (never submitted, or its record expired)")
    return jobs(service, [status])[0]


def _waited(service: Service, task_id: str, seconds: float) -> TaskStatus:
    last = service.client.status(task_id)
    with contextlib.suppress(WaitTimeout):
        for last in service.client.follow(task_id, timeout=seconds):  # noqa: B007  # the last one is the answer
            pass
    return last


def _submit(service: Service, body: bytes, priority: str, queue_anyway: bool, key: str | None) -> tuple[str, bool]:
    spec = RenderSpec.parse(body)  # the CLI's own check, so the same field and message
    # Whether the key was used before decides only 200 (a replay) or 201; the producer makes the submit atomic.
    replay = key is not None and bool(service.client.redis.exists(idempotency_key(key, service.client.tenant)))
    handle = service.client.submit(
        spec, priority=cast(Priority, priority), wait_for_worker=queue_anyway, idempotency_key=key
    )
    return handle.task_id, replay


@router.post("", status_code=201, openapi_extra=_SPEC_BODY, summary="Submit a job")
async def submit(
    request: Request,
    response: Response,
    service: Writer,
    priority: Annotated[str, Query(pattern="^(high|normal|low)$")] = "normal",
    queue_anyway: bool = False,
    idempotency_key: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Job:
    """Validate the render spec in the body and enqueue it. The same `Idempotency-Key` with the same body
    answers the same job (200) and enqueues nothing; with another body, 422 `idempotency_conflict`.
    `Prefer: wait=N` (N <= 60) holds the answer until the job is final or N seconds passed."""
    body = await request.body()
    task_id, replay = await run_in_threadpool(_submit, service, body, priority, queue_anyway, idempotency_key)
    if replay:
        response.status_code = 200
    response.headers["Location"] = f"{JOBS_PATH}/{task_id}"
    wait = _WAIT.search(prefer or "")
    if wait is not None:
        seconds = min(float(wait[1]), MAX_WAIT)
        response.headers["Preference-Applied"] = f"wait={seconds:g}"
        status = await run_in_threadpool(_waited, service, task_id, seconds)
        return (await run_in_threadpool(jobs, service, [status]))[0]
    return await run_in_threadpool(job_of, service, task_id)


@router.get("", summary="List jobs, newest first")
def list_jobs(
    service: Reader,
    batch: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> JobList:
    """Jobs newest first, `limit` a page; pass `next_cursor` back as `cursor` for the next page."""
    found, next_cursor = service.client.jobs(batch=batch, status=status, limit=limit, cursor=cursor)
    return JobList(jobs=jobs(service, found), next_cursor=next_cursor)


@router.get("/{task_id}", summary="A job")
def get_job(task_id: str, service: Reader) -> Job:
    """Where the job stands: status, step of total, the manifest once final, its files and links."""
    return job_of(service, task_id)


@router.post("/{task_id}/cancel", summary="Cancel a job")
def cancel(task_id: str, service: Writer) -> Job:
    """Stop the job: a queued one never starts, a running one stops at its next step. Idempotent: a final job
    is left as it is and answered."""
    job_of(service, task_id)  # 404 for an unknown id
    service.client.revoke(task_id)
    return job_of(service, task_id)


@router.get("/{task_id}/files", summary="A job's files")
def job_files(task_id: str, service: Reader) -> FileList:
    """Its images and frames once final (signed S3 links, or served by this service), else its newest frame."""
    job_of(service, task_id)
    return FileList(files=files(service, service.client.status(task_id)))
