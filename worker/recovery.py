"""Fast recovery of jobs whose worker died: re-enqueue a running job once its lease has expired.

Celery on Redis redelivers an unacknowledged job only after the visibility timeout (hours). Each
worker's main process scans `render:running` every `recovery_interval` seconds; a job listed there
whose lease is gone and whose result is not final is sent again under the same task id, by exactly
one worker (a short `SET NX` lock). The broker's late redelivery then finds the manifest and does
nothing.
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from celery import Celery, states
from celery.result import AsyncResult

from producer.keys import (
    ATTEMPT_HEADER,
    RUNNING_TASKS,
    SUBMITTED_AT_HEADER,
    TASK_RENDER,
    lease_key,
    manifest_key,
    recovery_lock_key,
)

log = logging.getLogger(__name__)


class RecoveryScanner:
    """Scans for dead jobs from a daemon thread; `scan_once` is the whole logic."""

    def __init__(self, app: Celery, client: redis.Redis, *, interval: float, owner: str) -> None:
        self.app = app
        self.client = client
        self.interval = interval
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="render-recovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan_once()
            except Exception:  # a scan failing (Redis away) must not end the scanner
                log.exception("recovery scan failed; retrying in %.1f s", self.interval)

    def scan_once(self) -> list[str]:
        """Re-enqueue every running job whose lease expired; return their ids."""
        recovered = []
        for raw_id, raw_record in self.client.hgetall(RUNNING_TASKS).items():
            task_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if self.client.exists(lease_key(task_id)):
                continue
            if not self.client.set(recovery_lock_key(task_id), self.owner, nx=True, ex=60):
                continue  # another worker is on it
            if self._is_final(task_id):
                self.client.hdel(RUNNING_TASKS, task_id)
                continue
            record = json.loads(raw_record)
            attempt = int(record.get("attempt") or 1) + 1
            self.app.send_task(
                TASK_RENDER,
                args=[record["spec"]],
                task_id=task_id,
                queue=record.get("queue"),
                headers={ATTEMPT_HEADER: attempt, SUBMITTED_AT_HEADER: record.get("submitted_at")},
            )
            self.client.hdel(RUNNING_TASKS, task_id)
            log.warning("task %s lost its worker %s; re-enqueued as attempt %d", task_id, record.get("worker"), attempt)
            recovered.append(task_id)
        return recovered

    def _is_final(self, task_id: str) -> bool:
        if self.client.exists(manifest_key(task_id)):
            return True
        return AsyncResult(task_id, app=self.app).state in states.READY_STATES
