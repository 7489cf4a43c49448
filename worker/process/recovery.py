"""Fast recovery of jobs whose worker died: re-enqueue a running job once its lease has expired.

Celery on Redis redelivers an unacknowledged job only after the visibility timeout (hours). Every
`recovery_interval` seconds one worker of the fleet scans (the one that takes `render:recovery-turn`, a
`SET NX` that lapses just before the next interval): it reads only the leases that lapsed, from
`render:lease-deadlines` (each lease's deadline, kept by its acquire and renewals in Redis server time),
so a scan costs O(dead jobs), and the fleet one scan per interval, however many jobs run. A lapsed job
whose result is not final is sent again under the same task id (a short per-task `SET NX` lock keeps
it to one sender). The broker's late redelivery then finds the manifest and does nothing.

A job that kills its worker (out of memory, a wedged decode) would kill worker after worker. Each dead run is
counted in `render:deaths:<task_id>` (`deaths_key`), beside the running record, by the run's lease token: the record
goes with each run and a count in the task's message would restart from the broker's late redelivery of the first
one, while this key outlives both, and a scan that sees one death twice (it stopped before unlisting the run)
counts it once. Only a run the GPU had taken (state `started` or `progress`) counts: the jobs the dead worker merely
held, waiting, were its neighbours. A job sent again shows `queued` until its next run starts, as after a hand-off.
The count belongs to the job's submission: resubmitted under the same id, it starts again. Drain hand-offs
re-enqueue a job without this scan, so they are no deaths. At `max_attempts` deaths the job ends `failed` instead,
as its task would have ended it: a `failed` manifest in storage (the checkpoint deleted) and in Redis, Celery's
FAILURE result, its webhook.

A worker can also die after the broker handed it a job but before the job took its lease (between
delivery and the first lines of the task). That job is only in kombu's `unacked` hash, which Redis
would restore after the visibility timeout. The scanner restores it sooner: an unacknowledged
delivery older than `grace` seconds whose task holds no lease, is not final and is not listed as
running goes back to the head of its queue. A delivery restored while its worker is alive after all
is harmless: the lease lets one of the two copies render, and the other is dropped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery, states
from celery.result import AsyncResult

from producer.errors import RenderFailed, StorageError
from producer.keys import (
    DEFAULT_TENANT,
    LEASE_DEADLINES,
    RECOVERY_TURN,
    RUNNING_TASKS,
    active_list,
    deaths_key,
    lease_key,
    manifest_key,
    recovery_lock_key,
)
from producer.records import PROGRESS_STATE, Progress, TaskMessage
from producer.records import text as _text
from producer.spec import RenderSpec
from producer.unsent import resend_unsent
from worker import metrics
from worker.engine.job import JobContext
from worker.engine.rendering import failed_outside_render
from worker.process.expiry import expire_overdue
from worker.process.fairshare import free_gpu, sweep_gpus
from worker.process.periodic import PeriodicThread
from worker.process.webhooks import WebhookSender
from worker.storage import Storage

log = logging.getLogger(__name__)

# A dead run leaves the running jobs: one entry of its queue's active list goes, and its record and lease deadline
# too while they are still its own (a new run of the job, sent just before, may have replaced them already).
_UNLIST = (
    "redis.call('lrem', KEYS[2], 1, ARGV[1]) if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then "
    "redis.call('hdel', KEYS[1], ARGV[1]) redis.call('zrem', KEYS[3], ARGV[1]) end return 1"
)
# A job's deaths: its submission (`submitted_at`, which every re-send and hand-off carries) and a field per dead run
# (its lease token). A new submission under the same id (a batch resubmitting its failed jobs) counts from 0 again.
_COUNT_DEATH = (
    "if redis.call('hget', KEYS[1], 'submitted_at') ~= ARGV[1] then redis.call('del', KEYS[1]) "
    "redis.call('hset', KEYS[1], 'submitted_at', ARGV[1]) end redis.call('hset', KEYS[1], 'run:' .. ARGV[2], 1) "
    "redis.call('expire', KEYS[1], ARGV[3]) return redis.call('hlen', KEYS[1]) - 1"
)
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RecoveryScanner(PeriodicThread):
    """Scans for dead jobs from a daemon thread; `scan_once` is the whole logic."""

    thread_name = "render-recovery"

    def __init__(
        self,
        app: Celery,
        client: redis.Redis,
        *,
        interval: float,
        owner: str,
        storage: Callable[[], Storage],
        grace: float = 30.0,
        max_attempts: int = 3,
        result_ttl: int = 7 * 24 * 3600,
        tenants: Sequence[str] = (DEFAULT_TENANT,),
    ) -> None:
        """`storage` opens the storage a failed job's manifest goes to (on the first one); `max_attempts`: the
        worker deaths after which a job ends failed; `result_ttl`: how long its manifest and death count live."""
        super().__init__(interval)
        self.app = app
        self.client = client
        self.owner = owner
        self.grace = grace
        self.max_attempts = max_attempts
        self.result_ttl = result_ttl
        self.tenants = list(tenants)
        self._open_storage = storage
        self._storage: Storage | None = None

    def tick(self) -> list[str]:
        """Scan if it is this worker's turn: one worker of the fleet per interval."""
        turn = int(self.interval * 1000 * 0.9)  # lapses before the holder's next tick: a lone worker scans each time
        if not self.client.set(RECOVERY_TURN, self.owner, nx=True, px=max(1, turn)):
            return []
        return self.scan_once()

    def scan_once(self) -> list[str]:
        """Re-enqueue every running job whose lease expired, every orphaned delivery and every message a submitter
        staged and never sent; return their ids."""
        with self.app.connection_for_write() as connection:
            qos = connection.default_channel.qos
            deliveries = self._deliveries(qos)
            running = self._recover_running(deliveries, qos)
            orphans = self._restore_orphans(deliveries, qos)
        # Messages a submitter staged with their jobs' records and died before sending (producer.unsent).
        resent = resend_unsent(self.app, self.client, grace=self.grace, tenants=self.tenants)
        sweep_gpus(self.client, self.tenants, grace=self.grace, now=time.time())
        # Jobs still queued past their deadline, which no worker took to expire them (worker.process.expiry).
        expire_overdue(
            self.app, self.client, self._opened_storage, self.tenants, result_ttl=self.result_ttl, grace=self.grace
        )
        return running + orphans + resent

    def _opened_storage(self) -> Storage:
        if self._storage is None:
            self._storage = self._open_storage()
        return self._storage

    def lapsed(self) -> list[str]:
        """The jobs whose lease deadline has passed (Redis server time): dead workers' jobs, and jobs ending now."""
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        return [_text(raw) for raw in self.client.zrangebyscore(LEASE_DEADLINES, "-inf", now_ms)]

    def _recover_running(self, deliveries: dict[str, list[str]], qos: Any) -> list[str]:
        recovered = []
        for task_id in self.lapsed():
            stale = deliveries.pop(task_id, [])  # handled here, not as an orphan
            if self.client.exists(lease_key(task_id)):
                continue  # taken again meanwhile: its new holder's deadline replaced this one
            raw_record = self.client.hget(RUNNING_TASKS, task_id)
            if raw_record is None:  # it ended: its release removed the record (and the deadline, unless Redis failed)
                self.client.zrem(LEASE_DEADLINES, task_id)
                continue
            lock = recovery_lock_key(task_id)
            if not self.client.set(lock, self.owner, nx=True, ex=60):
                continue  # another worker is on it
            try:
                # Under the lock, the record must still be the dead run's: it ended between the listing and the
                # lease check (its release removed both at once), or another scan handled it and a new run began.
                if self.client.hget(RUNNING_TASKS, task_id) == raw_record and self._recover(
                    task_id, raw_record, stale, qos
                ):
                    recovered.append(task_id)
            finally:
                self.client.eval(_UNLOCK, 1, lock, self.owner)  # the job's next death is recovered at once
        return recovered

    def _recover(self, task_id: str, raw_record: bytes | str, stale: list[str], qos: Any) -> bool:
        """Send the dead run's job again, or end it: whether it was sent again."""
        _drop(qos, stale)  # the dead worker's delivery: the job is re-sent below, or already final
        record = json.loads(raw_record)
        if self._is_final(task_id):
            self._settle(task_id)
            self._unlist(task_id, raw_record, record)
            return False
        run = AsyncResult(task_id, app=self.app)
        # A death counts against the job only if the GPU had taken it (started, or in progress): one the dead worker
        # merely held, waiting, was a neighbour of what killed it.
        on_gpu = run.state in (states.STARTED, PROGRESS_STATE)
        deaths = self._count_death(task_id, record) if on_gpu else None
        if deaths is not None and deaths >= self.max_attempts:
            try:
                self._fail(task_id, record, deaths, run.info if run.state == PROGRESS_STATE else None)
            except StorageError as exc:  # the record stays: the next scan tries again, counting no new death
                log.error("task %s: its failed manifest could not be stored (retried next scan): %s", task_id, exc)
                return False
            self._unlist(task_id, raw_record, record)
            return False
        message = TaskMessage.from_running(task_id, record).again()
        attempt = message.attempt
        self.app.backend.forget(task_id)  # queued again, as a hand-off leaves it; the next run's start is its own
        message.send(self.app)
        self._unlist(task_id, raw_record, record)
        log.warning(
            "task %s lost its worker %s (%s); re-enqueued as attempt %d",
            task_id,
            record.get("worker"),
            "held, not started" if deaths is None else f"death {deaths} of {self.max_attempts} allowed",
            attempt,
        )
        return True

    def _count_death(self, task_id: str, record: dict[str, Any]) -> int:
        """Add the dead run to its submission's deaths (once, however many scans see it); return how many it has."""
        run = record.get("lease") or f"{record.get('attempt')}:{record.get('worker')}"  # older workers' records
        submission = str(record.get("submitted_at"))
        return int(self.client.eval(_COUNT_DEATH, 1, deaths_key(task_id), submission, run, self.result_ttl))

    def _fail(self, task_id: str, record: dict[str, Any], deaths: int, progress: Any) -> None:
        """End a job whose workers kept dying as its task ends a failed one: the manifest in storage and Redis,
        Celery's FAILURE result, its webhook. `progress`: the last progress its run reported, if any."""
        reason = (
            f"its worker died {deaths} times during this job (RENDER_MAX_ATTEMPTS is {self.max_attempts}), so it is "
            "not sent again; look for the workers' out-of-memory kills or crashes in their logs"
        )
        spec = RenderSpec.parse(record["spec"])
        job = JobContext(spec, task_id, attempt=int(record.get("attempt") or 1), worker=record.get("worker"))
        reported = Progress.from_meta(progress)
        reached = reported.step if reported is not None else 0
        manifest = failed_outside_render(job, self._opened_storage(), reason, steps_completed=int(reached or 0))
        self.client.set(manifest_key(task_id), manifest.model_dump_json(), ex=self.result_ttl)
        self.app.backend.mark_as_failure(task_id, RenderFailed(f"task {task_id} failed: {reason}"))
        metrics.failed(task_id)
        if spec.webhook is not None:  # queued in Redis; a worker's sender delivers it, signed with its secret
            WebhookSender(self.client, secret=None).enqueue(task_id, spec.webhook, manifest.model_dump_json().encode())
        log.error("task %s failed: %s", task_id, reason)

    def _unlist(self, task_id: str, raw_record: bytes | str, record: dict[str, Any]) -> None:
        """The dead run is no longer running: out of `render:running`, its queue's active list, the deadlines and its
        tenant's GPUs."""
        keys = (RUNNING_TASKS, active_list(record.get("queue")), LEASE_DEADLINES)
        self.client.eval(_UNLIST, 3, *keys, task_id, raw_record)
        free_gpu(self.client, task_id)  # its tenant's GPU too (`max_gpus`): it waits on its queue again

    def _deliveries(self, qos: Any) -> dict[str, list[str]]:
        """Unacknowledged deliveries older than `grace`, by task id (kombu's `unacked` hash and its index)."""
        old = self.client.zrangebyscore(qos.unacked_index_key, "-inf", time.time() - self.grace)
        found: dict[str, list[str]] = defaultdict(list)
        for raw_tag in old:
            tag = _text(raw_tag)
            raw = self.client.hget(qos.unacked_key, tag)
            try:
                task_id = json.loads(raw)[0]["headers"]["id"] if raw else None
            except (ValueError, LookupError, TypeError):
                task_id = None
            if isinstance(task_id, str):
                found[task_id].append(tag)
        return found

    def _restore_orphans(self, deliveries: dict[str, list[str]], qos: Any) -> list[str]:
        restored = []
        for task_id, tags in deliveries.items():
            if self.client.exists(lease_key(task_id)):
                continue  # alive and rendering: its delivery is acknowledged when it ends
            if self.client.hexists(RUNNING_TASKS, task_id):
                # A run of it started: its lease may have lapsed since this scan read the lapsed ones, and the next
                # scan sends it again as its next attempt (`_recover_running`), not as a delivery never started.
                continue
            if not self.client.set(recovery_lock_key(task_id), self.owner, nx=True, ex=60):
                continue
            if self._is_final(task_id):  # its acknowledgement was lost (a Redis outage at the end)
                self._settle(task_id)
                _drop(qos, tags)
                continue
            qos.restore_by_tag(tags[0], leftmost=True)
            _drop(qos, tags[1:])
            log.warning("task %s was delivered %.0f+ s ago and never started; back on its queue", task_id, self.grace)
            restored.append(task_id)
        return restored

    def _settle(self, task_id: str) -> None:
        """A job whose manifest is published but whose result is not final: its worker died between the two (after
        the lease went, before Celery stored the result). The manifest becomes the result, as the task would have
        stored it, so `status`, `wait` and `AsyncResult.get` see the job end."""
        backend = self.app.backend
        if AsyncResult(task_id, app=self.app).state in states.READY_STATES:
            return
        raw = self.client.get(manifest_key(task_id))
        if raw is None:
            return
        manifest = json.loads(raw)
        status = manifest.get("status")
        if status == "revoked":
            backend.mark_as_revoked(task_id, f"revoked after {manifest.get('steps_completed')} steps")
        elif status == "failed":
            backend.mark_as_failure(task_id, RenderFailed(f"task {task_id} failed: {manifest.get('error')}"))
        else:
            backend.mark_as_done(task_id, manifest)
        log.warning("task %s ended (%s) but its worker died before storing the result; stored it", task_id, status)

    def _is_final(self, task_id: str) -> bool:
        if self.client.exists(manifest_key(task_id)):
            return True
        return AsyncResult(task_id, app=self.app).state in states.READY_STATES


def _drop(qos: Any, tags: list[str]) -> None:
    """Forget these unacknowledged deliveries (kombu's `unacked` hash and its index), without requeueing them."""
    for tag in tags:
        qos._remove_from_indices(tag).execute()
