"""`GET /v1/jobs/{id}/events`: Server-Sent Events, a full `Job` snapshot on connect and on every change.

Each event is `event: snapshot`, `id: <n>`, `data: <Job JSON>`. The id grows with the job's progress (its phase,
then its step), so a client reconnecting with `Last-Event-ID` is sent nothing until the job moved past what it
saw, and a stream whose last event was the final state ends at once. The job is read every `POLL` seconds for
each open stream (a few pipelined Redis round trips); `: keep-alive` comments keep proxies from closing an idle
stream. If the job cannot be read any more (Redis is away), an `event: error` with the error JSON ends the stream;
a client reconnects.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from producer.errors import RenderError
from service.deps import LinkReader, Service
from service.errors import ApiError, ErrorResponse
from service.jobs import job_of
from service.jobview import JOBS_PATH, Job

POLL = 0.2
KEEP_ALIVE = 15.0
_PHASES = {"unknown": 0, "queued": 0, "started": 1, "progress": 2}
_FINAL_PHASE = 3

router = APIRouter(prefix=JOBS_PATH, tags=["jobs"])


def event_id(job: Job) -> int:
    """Monotone over a job's life: phase (queued, started, rendering, final) then step."""
    return _PHASES.get(job.status, _FINAL_PHASE) * 1_000_000 + (job.step or 0)


def _final(job: Job) -> bool:
    return job.status not in _PHASES


async def snapshots(request: Request, service: Service, task_id: str, last_seen: int) -> AsyncIterator[str]:
    """The stream's text: snapshots as the job changes, ending after the final one."""
    sent: Job | None = None
    quiet_since = time.monotonic()
    yield "retry: 1000\n\n"
    while True:
        try:
            job = await run_in_threadpool(job_of, service, task_id)
        except (ApiError, RenderError) as exc:  # Redis went away, or the job's record expired: say so and end
            answer = exc.message if isinstance(exc, ApiError) else str(exc)
            code = exc.code if isinstance(exc, ApiError) else "unavailable"
            yield f"event: error\ndata: {json.dumps({'error': {'code': code, 'message': answer, 'field': None}})}\n\n"
            return
        number = event_id(job)
        if (job != sent) if sent is not None else (number > last_seen):
            sent, last_seen = job, max(number, last_seen)
            yield f"event: snapshot\nid: {last_seen}\ndata: {json.dumps(job.model_dump(mode='json'))}\n\n"
            quiet_since = time.monotonic()
        if _final(job):
            return
        if time.monotonic() - quiet_since >= KEEP_ALIVE:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL)


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorResponse}},
    summary="Follow a job (Server-Sent Events)",
)
async def events(
    task_id: str, request: Request, service: LinkReader, last_event_id: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    """A snapshot of the job now and on every change (state, step, newest preview), ending with its final state."""
    await run_in_threadpool(job_of, service, task_id)  # 404 before the stream starts
    seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
    return StreamingResponse(
        snapshots(request, service, task_id, seen),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
