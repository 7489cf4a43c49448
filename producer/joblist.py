"""The job listing (`RenderClient.jobs`): the job index `render:jobs`, newest first, a page at a time.

The index is a sorted set written with each job's record at submit (`producer.unsent.stage`): member the task id,
score the submit time in milliseconds. Jobs submitted together share a score; among them the order is the task ids',
descending (Redis's own order for `ZREVRANGEBYSCORE`). A cursor is `<score>:<task id>` of the last job a page held:
the next page starts after it, so jobs submitted meanwhile never shift a page (they are newer, on the first page).
A listing filtered by `status` reads jobs' statuses in chunks until the page is full, so a rare state costs a walk
through the index; jobs whose records expired (state `unknown`) are left out unless asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol

import redis

from producer.errors import SpecError
from producer.keys import job_index_key
from producer.records import text
from producer.status import STATES, TaskStatus

MAX_LIMIT = 1000
_CHUNK = 200

Entry = tuple[int, str]
"""(submit time in ms, task id): a job's place in the index."""


class ListingClient(Protocol):
    """What a listing needs of its client (`RenderClient`)."""

    @property
    def redis(self) -> redis.Redis: ...

    @property
    def tenant(self) -> str: ...

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]: ...


def parse_cursor(cursor: str | None) -> Entry | None:
    """A cursor as `encode_cursor` wrote it; SpecError naming `cursor` if it is not one."""
    if cursor is None or cursor == "":
        return None
    score, sep, task_id = cursor.partition(":")
    try:
        if not sep or not task_id:
            raise ValueError
        return int(score), task_id
    except ValueError:
        raise SpecError(f"cursor: {cursor[:60]!r} is not a cursor; pass the next_cursor a listing returned") from None


def encode_cursor(entry: Entry) -> str:
    return f"{entry[0]}:{entry[1]}"


def list_jobs(
    client: ListingClient,
    *,
    batch_ids: Sequence[str] | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[TaskStatus], str | None]:
    """A page of jobs, newest first, and the cursor of the next page (None: this was the last). `batch_ids`: only
    those jobs (a batch's); `status`: only jobs in that state."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise SpecError(f"limit: must be between 1 and {MAX_LIMIT}; got {limit!r}")
    if status is not None and status not in STATES:
        raise SpecError(f"status: must be one of {', '.join(STATES)}; got {status!r}")
    after = parse_cursor(cursor)
    index = job_index_key(client.tenant)
    entries = (
        _of_batch(client.redis, index, batch_ids, after)
        if batch_ids is not None
        else _indexed(client.redis, index, after)
    )
    found: list[tuple[Entry, TaskStatus]] = []
    for chunk in entries:
        for entry, current in zip(chunk, client.statuses([task_id for _, task_id in chunk]), strict=True):
            if (status is None and current.state != "unknown") or current.state == status:
                found.append((entry, dataclasses.replace(current, submitted_at=entry[0] / 1000 or None)))
        if len(found) > limit:
            break
    page = found[:limit]
    more = len(found) > limit
    return [current for _, current in page], encode_cursor(page[-1][0]) if more else None


def _indexed(client: redis.Redis, index: str, after: Entry | None) -> Iterator[list[Entry]]:
    """The index's entries after `after` (all, if None), newest first, in chunks."""
    while True:
        chunk: list[Entry] = []
        if after is None:
            top = "+inf"
        else:
            score, last = after
            ties: list[bytes] = client.zrevrangebyscore(index, score, score)  # type: ignore[assignment]
            chunk = [(score, member) for member in map(text, ties) if member < last]
            top = f"({score}"
        rows: list[tuple[bytes, float]] = client.zrevrangebyscore(  # type: ignore[assignment]
            index, top, "-inf", start=0, num=_CHUNK, withscores=True
        )
        chunk += [(int(score), text(member)) for member, score in rows]
        if not chunk:
            return
        yield chunk
        after = chunk[-1]


def _of_batch(client: redis.Redis, index: str, task_ids: Sequence[str], after: Entry | None) -> Iterator[list[Entry]]:
    """A batch's jobs after `after`, newest first (a job missing from the index last), in chunks."""
    ids = list(dict.fromkeys(task_ids))
    scores = client.zmscore(index, ids) if ids else []
    entries = sorted(
        ((int(score) if score is not None else 0, task_id) for task_id, score in zip(ids, scores, strict=True)),
        reverse=True,
    )
    if after is not None:
        entries = [entry for entry in entries if entry < after]
    for start in range(0, len(entries), _CHUNK):
        yield entries[start : start + _CHUNK]
