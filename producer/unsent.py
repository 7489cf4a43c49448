"""Submission that survives its submitter: a job's record never stands without a way to its message.

A submit writes each job's record (`render:job:<id>`, which status reads as `queued`) and, in the same Redis
transaction, the task message it is about to send into `render:unsent` (a sorted set: the message's JSON -> when it
was staged; a tenant's are in `render:t:<tenant>:unsent`, and its listing and deadlines beside them). Then it
sends the messages and removes them from the set. A submitter that dies in between (a SIGKILL, a lost connection, a
Redis error) leaves its messages there; the workers' recovery scan sends every one older than its grace
(`resend_unsent`). A message sent twice is harmless: one copy takes the job's lease and
renders, the other finds the lease or the final manifest and does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from celery import Celery

from producer.keys import DEFAULT_TENANT, JOB_INDEX_MAX, deadlines_key, job_index_key, job_key, tenant_of, unsent_key
from producer.records import TaskMessage


def stage(
    client: redis.Redis,
    messages: Sequence[TaskMessage],
    *,
    record_ttl: int,
    tenant: str = DEFAULT_TENANT,
    deadlines: Sequence[float | None] | None = None,
) -> None:
    """Write the jobs' records, their entries in the tenant's job index and their unsent messages in one
    transaction: all are there, or none. `deadlines`: each job's `deadline_seconds` (None: none)."""
    staging = client.pipeline(transaction=True)
    unsent_set, index = unsent_key(tenant), job_index_key(tenant)
    for message, deadline in zip(messages, deadlines or [None] * len(messages), strict=True):
        if tenant_of(message.task_id) != tenant:
            raise ValueError(f"task {message.task_id}: not an id of tenant {tenant}")
        if message.queue is None or message.priority is None or message.submitted_at is None:
            raise ValueError(f"task {message.task_id}: a submitted message names its queue, priority and time")
        staging.hset(
            job_key(message.task_id),
            mapping={"queue": message.queue, "priority": message.priority, "submitted_at": message.submitted_at},
        )
        staging.expire(job_key(message.task_id), record_ttl)
        staging.zadd(unsent_set, {message.encode(): message.submitted_at})
        staging.zadd(index, {message.task_id: int(message.submitted_at * 1000)})
        if deadline is not None:
            staging.zadd(deadlines_key(tenant), {message.task_id: message.submitted_at + deadline})
    if messages:  # the listing keeps the newest JOB_INDEX_MAX jobs, and none older than their records
        newest = max(message.submitted_at or 0.0 for message in messages)
        staging.zremrangebyscore(index, "-inf", f"({int((newest - record_ttl) * 1000)}")
        staging.zremrangebyrank(index, 0, -(JOB_INDEX_MAX + 1))
    staging.execute()


def sent(client: redis.Redis, messages: Sequence[TaskMessage], tenant: str = DEFAULT_TENANT) -> None:
    """The messages are on their queues: nothing is left to resend."""
    if messages:
        client.zrem(unsent_key(tenant), *(message.encode() for message in messages))


def resend_unsent(
    app: Celery,
    client: redis.Redis,
    *,
    grace: float,
    now: float | None = None,
    tenants: Sequence[str] = (DEFAULT_TENANT,),
) -> list[str]:
    """Send every message of `tenants` staged more than `grace` seconds ago and never marked sent; return their
    task ids.

    A job whose record expired meanwhile is dropped, not sent: nobody waits for it any more.
    """
    cutoff = (time.time() if now is None else now) - grace
    resent = []
    for tenant in tenants:
        key = unsent_key(tenant)
        raws: list[bytes] = client.zrangebyscore(key, "-inf", cutoff)  # type: ignore[assignment]
        for raw in raws:
            message = TaskMessage.decode(raw)
            if client.exists(job_key(message.task_id)):
                message.send(app)
                resent.append(message.task_id)
            client.zrem(key, raw)
    return resent
