"""Submission that survives its submitter: a job's record never stands without a way to its message.

A submit writes each job's record (`render:job:<id>`, which status reads as `queued`) and, in the same Redis
transaction, the task message it is about to send into `render:unsent` (a sorted set: the message's JSON -> when
it was staged). Then it sends the messages and removes them from the set. A submitter that dies in between (a
SIGKILL, a lost connection, a Redis error) leaves its messages there; the workers' recovery scan sends every one
older than its grace (`resend_unsent`). A message sent twice is harmless: one copy takes the job's lease and
renders, the other finds the lease or the final manifest and does nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery import Celery

from producer.keys import ATTEMPT_HEADER, SUBMITTED_AT_HEADER, TASK_RENDER, UNSENT_JOBS, job_key


@dataclass(frozen=True)
class Unsent:
    """One task message staged before it is sent: everything `send` needs to send it again."""

    task_id: str
    spec: str
    queue: str
    priority: int
    submitted_at: float

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> Unsent:
        return cls(**json.loads(raw))


def stage(client: redis.Redis, messages: Sequence[Unsent], *, record_ttl: int) -> None:
    """Write the jobs' records and their unsent messages in one transaction: both are there, or neither."""
    staging = client.pipeline(transaction=True)
    for message in messages:
        staging.hset(
            job_key(message.task_id),
            mapping={"queue": message.queue, "priority": message.priority, "submitted_at": message.submitted_at},
        )
        staging.expire(job_key(message.task_id), record_ttl)
    staging.zadd(UNSENT_JOBS, {message.encode(): message.submitted_at for message in messages})
    staging.execute()


def send(app: Celery, message: Unsent, *, producer: Any = None, attempt: int = 1) -> None:
    """Publish the `render.run` task message of `message`."""
    app.send_task(
        TASK_RENDER,
        args=[message.spec],
        task_id=message.task_id,
        queue=message.queue,
        priority=message.priority,
        producer=producer,
        headers={SUBMITTED_AT_HEADER: message.submitted_at, ATTEMPT_HEADER: attempt},
    )


def sent(client: redis.Redis, messages: Sequence[Unsent]) -> None:
    """The messages are on their queues: nothing is left to resend."""
    if messages:
        client.zrem(UNSENT_JOBS, *(message.encode() for message in messages))


def resend_unsent(app: Celery, client: redis.Redis, *, grace: float, now: float | None = None) -> list[str]:
    """Send every message staged more than `grace` seconds ago and never marked sent; return their task ids.

    A job whose record expired meanwhile is dropped, not sent: nobody waits for it any more.
    """
    cutoff = (time.time() if now is None else now) - grace
    resent = []
    raws: list[bytes] = client.zrangebyscore(UNSENT_JOBS, "-inf", cutoff)  # type: ignore[assignment]
    for raw in raws:
        message = Unsent.decode(raw)
        if client.exists(job_key(message.task_id)):
            send(app, message)
            resent.append(message.task_id)
        client.zrem(UNSENT_JOBS, raw)
    return resent
