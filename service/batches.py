"""`/v1/batches`: submit or resume a named batch (the semantics of `render batch`), follow it, cancel it."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.batch import BatchHandle, default_name, describe
from producer.errors import BatchFileError, SpecError
from producer.keys import Priority
from service.deps import Reader, Service, Writer
from service.errors import ApiError, ErrorResponse
from service.jobview import JOBS_PATH

BATCHES_PATH = "/v1/batches"
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422)}
_LINES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "description": "one render spec per line"}},
            "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
        },
    }
}

router = APIRouter(prefix=BATCHES_PATH, tags=["batches"], responses=_ERRORS)


class BatchLinks(BaseModel):
    self: str
    cancel: str
    jobs: str


class Batch(BaseModel):
    """A batch's jobs counted by state, its throughput since this run was submitted, and the time left."""

    name: str
    total: int
    counts: dict[str, int]
    images_per_second: float | None
    eta_seconds: float | None
    links: BatchLinks
    submitted: dict[str, int] | None = None
    """On submit: what submitting did (new, skipped, in_flight, failed, revoked, lost)."""
    cancelled: dict[str, int] | None = None
    """On cancel: dequeued, stopping, finished, unknown."""


def _lines(body: bytes) -> list[str]:
    """The body's specs as lines: JSONL as sent, or a JSON array's items one per line (numbered from 1)."""
    content = body.decode("utf-8", errors="replace")
    if not content.lstrip().startswith("["):
        return content.splitlines()
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise BatchFileError(
            [f"line 1: not valid JSON ({exc.msg} at column {exc.colno}); send JSONL or an array"]
        ) from None
    if not isinstance(items, list):
        raise BatchFileError(["line 1: must be a JSON array of specs, or JSONL"])
    return [json.dumps(item) for item in items]


def _handle(service: Service, name: str) -> BatchHandle:
    try:
        return service.client.batch(name)
    except SpecError as exc:
        raise ApiError(404, "not_found", str(exc).removeprefix("name: "), field="name") from None


def summary(service: Service, handle: BatchHandle) -> Batch:
    """Counts, images/s since the run was submitted (to its last finished job once all are done), ETA."""
    statuses = handle.statuses()
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    started = describe(service.client, handle.name).get("updated_at")
    finished = [s for s in statuses if s.done]
    images = sum(len(s.manifest.images) for s in finished if s.manifest is not None and s.state == "succeeded")
    remaining = len(statuses) - len(finished) - counts.get("unknown", 0)
    ends = [datetime.fromisoformat(s.manifest.finished_at).timestamp() for s in finished if s.manifest is not None]
    until = time.time() if remaining or not ends else max(ends)
    elapsed = until - started if started is not None else 0.0
    rate = images / elapsed if images and elapsed > 0 else None
    jobs_rate = len(finished) / elapsed if finished and elapsed > 0 else None
    eta = 0.0 if not remaining else (remaining / jobs_rate if jobs_rate else None)
    base = f"{BATCHES_PATH}/{handle.name}"
    return Batch(
        name=handle.name,
        total=len(statuses),
        counts=counts,
        images_per_second=None if rate is None else round(rate, 3),
        eta_seconds=None if eta is None else round(eta, 1),
        links=BatchLinks(self=base, cancel=f"{base}/cancel", jobs=f"{JOBS_PATH}?batch={handle.name}"),
    )


def _submit(service: Service, body: bytes, name: str | None, priority: str, queue_anyway: bool) -> Batch:
    lines = _lines(body)
    handle = service.client.submit_batch(
        lines,
        name=name or default_name("batch", body),
        source="http",
        priority=cast(Priority, priority),  # the route's pattern admits only the three
        wait_for_worker=queue_anyway,
    )
    found = summary(service, handle)
    found.submitted = dict(handle.counts)
    return found


@router.post(
    "",
    status_code=201,
    openapi_extra=_LINES_BODY,
    responses={429: {"model": ErrorResponse}},
    summary="Submit or resume a batch",
)
async def submit_batch(
    request: Request,
    response: Response,
    service: Writer,
    name: str | None = None,
    priority: Annotated[str, Query(pattern="^(high|normal|low)$")] = "normal",
    queue_anyway: bool = False,
) -> Batch:
    """Every line is validated first (422 lists each bad one, nothing is sent); a batch submitted again by
    name skips its succeeded lines, leaves running ones alone, and submits failed, revoked and lost ones again."""
    body = await request.body()
    found = await run_in_threadpool(_submit, service, body, name, priority, queue_anyway)
    response.headers["Location"] = found.links.self
    return found


@router.get("/{name}", summary="A batch's progress")
def get_batch(name: str, service: Reader) -> Batch:
    return summary(service, _handle(service, name))


@router.post("/{name}/cancel", summary="Cancel a batch")
def cancel_batch(name: str, service: Writer) -> Batch:
    """Queued jobs are taken off their queue, running ones stop at their next step; finished ones are left."""
    handle = _handle(service, name)
    counts = handle.revoke()
    found = summary(service, handle)
    found.cancelled = counts
    return found
