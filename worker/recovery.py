"""Fast recovery of jobs whose worker died: re-enqueue a running job once its lease has expired.

Celery on Redis redelivers an unacknowledged job only after the visibility timeout (hours). Every
`recovery_interval` seconds one worker of the fleet scans (the one that takes `render:recovery-turn`, a
`SET NX` that lapses just before the next interval): it reads only the leases that lapsed, from
`render:lease-deadlines` (each lease's deadline, kept by its acquire and renewals in Redis server time),
so a scan costs O(dead jobs), and the fleet one scan per interval, however many jobs run. A lapsed job
whose result is not final is sent again under the same task id (a short per-task `SET NX` lock keeps
it to one sender). The broker's late redelivery then finds the manifest and does nothing.

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
from typing import Any

import redis
from celery import Celery, states
from celery.result import AsyncResult

from producer.errors import RenderFailed
from producer.keys import (
    ATTEMPT_HEADER,
    LEASE_DEADLINES,
    RECOVERY_TURN,
    RUNNING_TASKS,
    SUBMITTED_AT_HEADER,
    TASK_RENDER,
    active_list,
    lease_key,
    manifest_key,
    recovery_lock_key,
)
from producer.unsent import resend_unsent
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)


class RecoveryScanner(PeriodicThread):
    """Scans for dead jobs from a daemon thread; `scan_once` is the whole logic."""

    thread_name = "render-recovery"

    def __init__(self, app: Celery, client: redis.Redis, *, interval: float, owner: str, grace: float = 30.0) -> None:
        super().__init__(interval)
        self.app = app
        self.client = client
        self.owner = owner
        self.grace = grace

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
        return running + orphans + resend_unsent(self.app, self.client, grace=self.grace)

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
            if not self.client.set(recovery_lock_key(task_id), self.owner, nx=True, ex=60):
                continue  # another worker is on it
            if not self.client.hexists(RUNNING_TASKS, task_id):
                continue  # it ended between the listing and the lease check: its release removed both at once
            _drop(qos, stale)  # the dead worker's delivery: the job is re-sent below, or already final
            record = json.loads(raw_record)
            if self._is_final(task_id):
                self._settle(task_id)
                self._unlist(task_id, record)
                continue
            attempt = int(record.get("attempt") or 1) + 1
            self.app.send_task(
                TASK_RENDER,
                args=[record["spec"]],
                task_id=task_id,
                queue=record.get("queue"),
                priority=record.get("priority"),
                headers={ATTEMPT_HEADER: attempt, SUBMITTED_AT_HEADER: record.get("submitted_at")},
            )
            self._unlist(task_id, record)
            log.warning("task %s lost its worker %s; re-enqueued as attempt %d", task_id, record.get("worker"), attempt)
            recovered.append(task_id)
        return recovered

    def _unlist(self, task_id: str, record: dict[str, Any]) -> None:
        """The dead job is no longer running: out of `render:running` and its queue's active list."""
        unlist = self.client.pipeline(transaction=True)
        unlist.hdel(RUNNING_TASKS, task_id)
        unlist.lrem(active_list(record.get("queue")), 1, task_id)
        unlist.zrem(LEASE_DEADLINES, task_id)
        unlist.execute()

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


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _drop(qos: Any, tags: list[str]) -> None:
    """Forget these unacknowledged deliveries (kombu's `unacked` hash and its index), without requeueing them."""
    for tag in tags:
        qos._remove_from_indices(tag).execute()
