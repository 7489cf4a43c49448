"""Deadlines of jobs that no worker takes: the recovery scan ends them `expired` while they wait on their queue.

A worker checks a job's `deadline_seconds` when it takes the job (`worker.process.runner.expiry`), but a job for a
model no live worker serves, or stuck behind a long backlog, is never taken. Submits record every job with a
deadline in its tenant's sorted set (`producer.keys.deadlines_key`: task id -> when the deadline passes), and each
recovery scan (one worker of the fleet per interval) reads the entries whose time has passed, at most `limit` of
them, oldest first:

- a job that ended (its record gone, a final result or manifest), or whose message says a worker already started
  it (a hand-off or a dead worker's job sent again, which never expires), leaves the set;
- a job a worker holds (a lease, a started state, and for a capped tenant a delivery it took: its GPU slot) stays:
  that worker checks the deadline itself;
- a job still on its queue is taken off it (`producer.queued`, as a revoke does), and only if the removal worked (a
  worker may have popped it meanwhile) is it ended as its worker would have ended it: an `expired` manifest with no
  image, in storage and Redis, Celery's result, its webhook, the job metrics. The manifest's error says why it
  waited when that is known: no live worker serves its model.

A job on no list and held by no worker (its submitter died before sending it, which the same scan resends), or taken
by a worker that has not leased it yet (an uncapped tenant's job takes no slot to tell), stays for `grace` seconds
past its deadline and then leaves the set: the worker that takes it still expires it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from celery import Celery, states

from producer import queued
from producer.errors import SpecError, StorageError
from producer.fleet import live_workers, served_by
from producer.keys import deadlines_key, gpus_key, job_key, lease_key, manifest_key, revoked_key, tenant_of
from producer.manifest import Manifest
from producer.records import TaskMessage
from producer.records import text as _text
from producer.spec import RenderSpec
from worker import metrics
from worker.engine.job import JobContext
from worker.engine.rendering import expired_before_start
from worker.engine.stops import JobExpired
from worker.process.webhooks import WebhookSender
from worker.storage import Storage

log = logging.getLogger(__name__)

SCAN_LIMIT = 500
"""The most deadline entries one scan looks at: a scan stays short however many jobs are overdue at once."""
BUDGET_SECONDS = 5.0
"""How long one scan goes on ending jobs (each a manifest upload); the rest wait for the next scan."""


class ExpiredWaiting(JobExpired):
    """A job whose deadline passed while it waited on its queue, ended by the recovery scan."""

    def __init__(self, deadline_seconds: float, why: str | None) -> None:
        super().__init__(deadline_seconds)
        self.why = why  # what kept it waiting, when known

    @property
    def error(self) -> str:
        why = self.why or "no worker was free to start it"
        return f"deadline of {self.deadline_seconds:g} s passed while it waited in its queue: {why}"


@dataclass(frozen=True)
class _Due:
    task_id: str
    at: float  # when its deadline passed (epoch seconds)
    key: str  # its tenant's deadlines set
    queue: str | None = None  # its job record's queue, when it still waits there


def expire_overdue(
    app: Celery,
    client: redis.Redis,
    storage: Callable[[], Storage],
    tenants: Sequence[str],
    *,
    result_ttl: int,
    grace: float,
    now: float | None = None,
    limit: int = SCAN_LIMIT,
    budget: float = BUDGET_SECONDS,
) -> list[str]:
    """End `expired` every job of `tenants` still queued past its deadline (at most `limit` entries looked at, for
    about `budget` seconds); return their ids. `storage` opens the storage their manifests go to (called only when
    one expires)."""
    now = time.time() if now is None else now
    due: list[_Due] = []
    for tenant in tenants:
        key = deadlines_key(tenant)
        entries: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
            key, "-inf", now, start=0, num=limit - len(due), withscores=True
        )
        due += [_Due(_text(raw), float(at), key) for raw, at in entries]
        if len(due) >= limit:
            break
    if not due:
        return []
    done, waiting = _triage(app, client, due)
    expired: list[str] = []
    if waiting:
        found = queued.find(client, {entry.queue for entry in waiting if entry.queue}, {e.task_id for e in waiting})
        ended, settled = _take_off(app, client, storage, waiting, found, now, result_ttl, budget)
        expired, done = ended, done + settled
        seen = {item.task_id for item in found}
        done += [entry for entry in waiting if entry.task_id not in seen and now - entry.at > grace]
    forget = client.pipeline(transaction=False)
    for entry in done:
        forget.zrem(entry.key, entry.task_id)
    forget.execute()
    return expired


def _triage(app: Celery, client: redis.Redis, due: list[_Due]) -> tuple[list[_Due], list[_Due]]:
    """Split the overdue entries into those that leave the set now (ended, or revoked: its revoke ends it) and those
    still waiting on a queue; jobs a worker holds are in neither. One pipelined round trip."""
    backend = app.backend
    reads = client.pipeline(transaction=False)
    for entry in due:
        task_id = entry.task_id
        reads.hget(job_key(task_id), "queue")
        reads.get(backend.get_key_for_task(task_id))
        reads.exists(manifest_key(task_id), revoked_key(task_id))
        reads.exists(lease_key(task_id))
        reads.zscore(gpus_key(tenant_of(task_id)), task_id)  # a capped tenant's job taken and not leased yet
    replies = reads.execute()
    done: list[_Due] = []
    waiting: list[_Due] = []
    for index, entry in enumerate(due):
        queue, meta, ended, leased, held = replies[index * 5 : index * 5 + 5]
        state = backend.decode_result(meta)["status"] if meta else states.PENDING
        if queue is None or ended or state in states.READY_STATES:
            done.append(entry)
        elif not leased and held is None and state == states.PENDING:
            waiting.append(_Due(entry.task_id, entry.at, entry.key, _text(queue)))
    return done, waiting


def _take_off(
    app: Celery,
    client: redis.Redis,
    storage: Callable[[], Storage],
    waiting: list[_Due],
    found: list[queued.Queued],
    now: float,
    result_ttl: int,
    budget: float,
) -> tuple[list[str], list[_Due]]:
    """Take each found job that may expire off its queue and end it, for `budget` seconds at most; return the ids
    ended and the entries that leave the set (those ended, and those that never expire)."""
    stop_at = time.monotonic() + budget
    entries = {entry.task_id: entry for entry in waiting}
    served: set[str] | None = None
    ended: list[str] = []
    settled: list[_Due] = []
    for item in {item.task_id: item for item in reversed(found)}.values():  # a job's first copy found, if sent twice
        entry = entries[item.task_id]
        message = item.message()
        if message is None:
            continue  # not a message this farm's producers write: the worker that pops it drops it
        deadline = _deadline(message)
        if deadline is None:
            settled.append(entry)
            continue
        spec, at = deadline
        if time.monotonic() > stop_at:
            break
        if now < at or not queued.take_off(client, [item]):
            continue  # resubmitted since (its own deadline counts), or a worker popped it meanwhile (it checks)
        if served is None:
            served = set(served_by(live_workers(client)))
        reason = None if spec.model in served else f"no live worker serves {spec.model}"
        try:
            _end(app, client, storage(), message, spec, reason, now, result_ttl)
        except StorageError as exc:  # back where it was (the oldest end): the next scan, or a worker, ends it
            client.rpush(item.list, item.raw)
            log.error("task %s: its expired manifest could not be stored (retried next scan): %s", item.task_id, exc)
            continue
        ended.append(item.task_id)
        settled.append(entry)
    return ended, settled


def _deadline(message: TaskMessage) -> tuple[RenderSpec, float] | None:
    """The job's spec and when its deadline passes; None if it never expires: a worker started it before (handed
    back, or sent again after its worker died: `worker.process.runner.expiry`), it has no deadline, or its spec
    cannot be read here (the worker that takes it fails it)."""
    if message.attempt - 1 > message.load_failures or message.submitted_at is None:
        return None
    try:
        spec = RenderSpec.parse(message.spec)
    except SpecError:
        return None
    if spec.deadline_seconds is None:
        return None
    return spec, message.submitted_at + spec.deadline_seconds


def _end(
    app: Celery,
    client: redis.Redis,
    storage: Storage,
    message: TaskMessage,
    spec: RenderSpec,
    reason: str | None,
    now: float,
    result_ttl: int,
) -> Manifest:
    """End a job taken off its queue as a worker ends one expired before it started: its manifest in storage and
    Redis, Celery's result (the manifest, as the task returns it), its webhook, the job metrics."""
    assert spec.deadline_seconds is not None and message.submitted_at is not None
    task_id = message.task_id
    waited = max(0.0, now - message.submitted_at)
    job = JobContext(spec, task_id, attempt=message.attempt, queue_wait=waited)
    manifest = expired_before_start(job, storage, ExpiredWaiting(spec.deadline_seconds, reason))
    body = manifest.model_dump_json()
    client.set(manifest_key(task_id), body, ex=result_ttl)
    app.backend.mark_as_done(task_id, manifest.model_dump(mode="json"))
    metrics.record(manifest)
    if spec.webhook is not None:  # queued in Redis; a worker's sender delivers it, signed with its secret
        WebhookSender(client, secret=None).enqueue(task_id, spec.webhook, body.encode())
    log.warning("task %s expired: %s", task_id, manifest.error)
    return manifest
