"""How a worker advertises itself to the fleet (read back by `producer.fleet`).

The main process beats (`Heartbeat`): its hash with the models it serves and the queues it consumes,
refreshed with a TTL, and its score in the indexes. The render process, where jobs run, adds what only
it knows (`JobAdvert`): the models loaded, loads per model, the job in hand and its step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import redis
from redis.typing import EncodableT, FieldT

from producer.keys import WORKERS, model_workers_key, worker_key
from producer.records import WorkerInfo

if TYPE_CHECKING:  # the main process needs no models
    from worker.models.registry import ModelRegistry

log = logging.getLogger(__name__)

PRUNE_AFTER_TTLS = 10
"""Index entries older than this many TTLs are removed by any live worker's heartbeat."""

# Write only into a hash that exists: the render process never revives a worker that stopped or died.
_SET_IF_LIVE = (
    "if redis.call('exists', KEYS[1]) == 1 then redis.call('hset', KEYS[1], unpack(ARGV)) return 1 end return 0"
)


class Heartbeat:
    """Advertises one worker from a daemon thread of its main process: one round trip every `interval` s."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        hostname: str,
        models: Sequence[str],
        queues: Sequence[str],
        interval: float,
        ttl: float,
        families: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.models = list(models)
        self.families = dict(families or {})  # model -> its family (sd15, sdxl, sd3, flux)
        self.queues = list(queues)
        self.interval = interval
        self.ttl = ttl
        self.clock = clock
        self.pid = os.getpid()
        self.started_at = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._withdrawn = False
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name="render-heartbeat", daemon=True)

    def start(self, hostname: str | None = None) -> None:
        """Beat now and every `interval` seconds, as `hostname` (Celery's node name) when given."""
        self.hostname = hostname or self.hostname
        self.pid = os.getpid()
        self.started_at = self.clock()
        try:  # the first beat before the worker reports ready: a submit right after start finds it served
            self.beat()
        except redis.RedisError as exc:
            log.warning("first heartbeat of %s failed (the thread retries): %s", self.hostname, exc)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove this worker from the fleet at once (graceful shutdown): one round trip."""
        self._stop.set()
        with self._lock:  # a beat in flight finishes first and none follows, so nothing is written back
            self._withdrawn = True
            withdraw = self.client.pipeline(transaction=True)
            withdraw.delete(worker_key(self.hostname))
            for index in self._indexes():
                withdraw.zrem(index, self.hostname)
            try:
                withdraw.execute()
            except redis.RedisError as exc:
                log.warning(
                    "could not remove worker %s from the fleet (it drops out within %.0f s): %s",
                    self.hostname,
                    self.ttl,
                    exc,
                )

    def withdraw_model(self, model: str, queue: str) -> None:
        """This worker no longer serves `model` (it failed to load here): out of the model's index at once, and out
        of the advert's models and queues from this beat on, so submits and `render workers` stop counting on it."""
        with self._lock:
            if model not in self.models:
                return
            self.models.remove(model)
            self.queues = [name for name in self.queues if name != queue]
        try:
            self.client.zrem(model_workers_key(model), self.hostname)
            self.beat()
        except redis.RedisError as exc:
            log.warning(
                "could not withdraw %s from %s's advert now (the next beat does): %s", model, self.hostname, exc
            )

    def beat(self, now: float | None = None) -> None:
        """Advertise once: the static fields, the hash's TTL and the index scores, in one MULTI/EXEC."""
        with self._lock:
            if self._withdrawn:
                return
            now = self.clock() if now is None else now
            key = worker_key(self.hostname)
            advert = WorkerInfo.beat_fields(
                self.hostname,
                models=self.models,
                queues=self.queues,
                families={model: self.families[model] for model in self.models if model in self.families},
                pid=self.pid,
                started_at=self.started_at,
                last_seen=now,
                ttl=self.ttl,
            )
            fields: dict[FieldT, EncodableT] = {name: value for name, value in advert.items()}  # redis-py's types
            beat = self.client.pipeline(transaction=True)
            beat.hset(key, mapping=fields)
            beat.pexpire(key, max(1, int(self.ttl * 1000)))
            for index in self._indexes():
                beat.zadd(index, {self.hostname: now})
                beat.zremrangebyscore(index, "-inf", f"({now - PRUNE_AFTER_TTLS * self.ttl}")
            beat.execute()

    def _indexes(self) -> list[str]:
        return [WORKERS, *(model_workers_key(model) for model in self.models)]

    def _loop(self) -> None:
        while True:
            try:
                self.beat()
                if self._failing:
                    log.warning("heartbeat of %s is back", self.hostname)
                self._failing = False
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning(
                        "heartbeat of %s failed (retrying every %.1f s; it drops out of the fleet after %.0f s): %s",
                        self.hostname,
                        self.interval,
                        self.ttl,
                        exc,
                    )
                self._failing = True
            if self._stop.wait(self.interval):
                return


class JobAdvert:
    """What the render process adds to its worker's hash: models loaded, loads, the job in hand and its step.

    Each write is one round trip and never fails a job: a Redis error is logged at debug and ignored, and
    progress is not written again for `backoff` seconds, so a Redis that hangs does not stall every step.
    """

    def __init__(
        self, client: redis.Redis, hostname: str | None, registry: ModelRegistry, *, backoff: float = 5.0
    ) -> None:
        self.client = client
        self.key = worker_key(hostname) if hostname else None
        self.registry = registry
        self.backoff = backoff
        self._script = client.register_script(_SET_IF_LIVE)
        self._sent: dict[str, str] = {}  # loaded and loads as last written: sent again only when they change
        self._retry_at = float("-inf")
        self._progress: dict[str, str] = {}  # the step last written

    def job_started(self, task_id: str) -> None:
        """The worker took `task_id`; its step is not known yet."""
        self._progress = {}
        self._write(WorkerInfo.job_fields(task_id))

    def progress(self, step: int, total: int) -> None:
        """The job in hand reached `step` of `total` (called with the throttled progress report)."""
        fields = WorkerInfo.progress_fields(step, total)
        if fields != self._progress and time.monotonic() >= self._retry_at:  # a batch's jobs share their step
            self._progress = fields
            self._write(fields)

    def job_ended(self) -> None:
        """The job in hand ended, however it ended."""
        self._write(WorkerInfo.job_fields(None))

    def _write(self, fields: dict[str, str]) -> None:
        if self.key is None:
            return
        state = WorkerInfo.load_fields(
            self.registry.loaded_models(), self.registry.loads, self.registry.compile_seconds
        )
        fields = {**fields, **{name: value for name, value in state.items() if self._sent.get(name) != value}}
        try:
            written = self._script(keys=[self.key], args=[part for pair in fields.items() for part in pair])
        except Exception as exc:  # advertising is informative; the job's own Redis use reports real trouble
            log.debug("could not advertise %s in %s: %s", sorted(fields), self.key, exc)
            self._retry_at = time.monotonic() + self.backoff
            written = 0
        self._sent = state if written else {}
