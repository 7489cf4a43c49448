"""`RenderClient`: submit, follow, revoke and fetch render jobs. Imports no torch, no diffusers, no worker."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import redis
from celery import Celery, states
from celery.exceptions import BackendError
from kombu.exceptions import OperationalError

from producer.celery_config import base_config
from producer.errors import FarmUnavailable, NoWorkerForModel, RenderError, RenderFailed, SpecError
from producer.fleet import WorkerInfo, live_workers, queue_lengths, served_by, served_models
from producer.keys import (
    ATTEMPT_HEADER,
    DEFAULT_PRIORITY,
    PRIORITIES,
    SUBMITTED_AT_HEADER,
    TASK_RENDER,
    Priority,
    check_task_id,
    job_key,
    manifest_key,
    model_queue,
    revoked_key,
)
from producer.manifest import Manifest
from producer.settings import ClientSettings
from producer.spec import RenderSpec

State = Literal["unknown", "queued", "started", "progress", "succeeded", "interrupted", "revoked", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "interrupted", "revoked", "failed"})
RevokeOutcome = Literal["revoked", "already-finished", "unknown"]


def redacted(url: str) -> str:
    """The Redis URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username or ''}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return parsed._replace(netloc=netloc).geturl()


class WaitTimeout(RenderError):
    """Raised when `wait` gives up before the job reached a final state."""


@dataclass(frozen=True)
class JobHandle:
    """What `submit` returns: the task id, and the client to ask about it."""

    task_id: str
    client: RenderClient

    def status(self) -> TaskStatus:
        return self.client.status(self.task_id)

    def wait(self, timeout: float | None = None) -> Manifest:
        return self.client.wait(self.task_id, timeout)

    def revoke(self) -> RevokeOutcome:
        return self.client.revoke(self.task_id)


@dataclass(frozen=True)
class TaskStatus:
    """Where a job stands. `step`/`total` while it renders; `manifest` once it is final; `error` if it failed."""

    task_id: str
    state: State
    step: int | None = None
    total: int | None = None
    manifest: Manifest | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _coerce_spec(spec: RenderSpec | dict[str, Any] | str) -> RenderSpec:
    return spec if isinstance(spec, RenderSpec) else RenderSpec.parse(spec)


class RenderClient:
    """A connection to one render farm (its Redis). Thread-safe; create one per application."""

    def __init__(self, settings: ClientSettings | None = None, *, redis_url: str | None = None) -> None:
        self.settings = settings or ClientSettings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        url = self.settings.redis_url
        self.app = Celery("render-producer", set_as_current=False)
        self.app.conf.update(base_config(url, queue=self.settings.queue, result_ttl=self.settings.result_ttl))
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)

    # -- submitting -----------------------------------------------------------------------------------

    def submit(
        self,
        spec: RenderSpec | dict[str, Any] | str,
        task_id: str | None = None,
        queue: str | None = None,
        *,
        priority: Priority = DEFAULT_PRIORITY,
        wait_for_worker: bool = False,
    ) -> JobHandle:
        """Validate `spec` and enqueue it for its model's workers; see `submit_many`."""
        return self.submit_many(
            [spec],
            task_ids=None if task_id is None else [task_id],  # an empty id is refused, not replaced
            queue=queue,
            priority=priority,
            wait_for_worker=wait_for_worker,
        )[0]

    def submit_many(
        self,
        specs: Iterable[RenderSpec | dict[str, Any] | str],
        *,
        task_ids: Sequence[str] | None = None,
        queue: str | None = None,
        priority: Priority = DEFAULT_PRIORITY,
        wait_for_worker: bool = False,
    ) -> list[JobHandle]:
        """Validate every spec first (nothing is enqueued if one is bad), then enqueue all in one batch.

        Each job goes to its model's queue, which only workers serving that model consume, at `priority`
        (`high` jobs start before any `normal` one waiting, `low` after). `queue` sends every job to that one
        queue instead (a single-model fleet's old layout). A model no live worker serves raises
        `NoWorkerForModel` before anything is enqueued, unless `wait_for_worker` (a fleet that scales from zero).
        """
        if priority not in PRIORITIES:
            raise SpecError(f"priority: must be one of {', '.join(PRIORITIES)}; got {priority!r}")
        parsed = []
        for index, spec in enumerate(specs):
            try:
                parsed.append(_coerce_spec(spec))
            except SpecError as exc:
                raise SpecError(f"specs[{index}]: {exc}") from None
        ids = list(task_ids) if task_ids is not None else [uuid.uuid4().hex for _ in parsed]
        if len(ids) != len(parsed):
            raise SpecError(f"task_ids: got {len(ids)} ids for {len(parsed)} specs; give one per spec or none")
        for index, task_id in enumerate(ids):
            check_task_id(task_id, f"task_ids[{index}]")
        queues = [queue or model_queue(self.settings.queue, spec.model) for spec in parsed]
        with self._reaching():
            if not wait_for_worker:
                self._check_served(sorted({spec.model for spec in parsed}))
            return self._enqueue(parsed, ids, queues, PRIORITIES[priority])

    def _check_served(self, models: list[str]) -> None:
        """Raise `NoWorkerForModel` for the first model no live worker serves: one Redis round trip when all are."""
        for model, count in served_models(self.redis, models, ttl=self.settings.heartbeat_ttl).items():
            if not count:
                raise NoWorkerForModel(model, served_by(live_workers(self.redis)))

    def _enqueue(self, parsed: list[RenderSpec], ids: list[str], queues: list[str], priority: int) -> list[JobHandle]:
        now = time.time()
        records = self.redis.pipeline(transaction=False)
        for task_id, queue in zip(ids, queues, strict=True):
            records.hset(job_key(task_id), mapping={"queue": queue, "priority": priority, "submitted_at": now})
            records.expire(job_key(task_id), self.settings.result_ttl)
        records.execute()
        with self.app.producer_or_acquire() as producer, producer.batch():
            for task_id, spec, queue in zip(ids, parsed, queues, strict=True):
                self.app.send_task(
                    TASK_RENDER,
                    args=[spec.model_dump_json()],
                    task_id=task_id,
                    queue=queue,
                    priority=priority,
                    producer=producer,
                    headers={SUBMITTED_AT_HEADER: now, ATTEMPT_HEADER: 1},
                )
        return [JobHandle(task_id, self) for task_id in ids]

    # -- asking ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn the many ways Redis can be away (redis-py, kombu, Celery's backend) into one clear error."""
        try:
            yield
        except (redis.RedisError, OperationalError, BackendError, ConnectionError, TimeoutError) as exc:
            cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ else exc
            raise FarmUnavailable(
                f"cannot reach the farm's Redis at {redacted(self.settings.redis_url)} "
                f"({type(cause).__name__}: {cause}); check that it is up and RENDER_REDIS_URL"
            ) from exc

    def status(self, task_id: str) -> TaskStatus:
        """Where the job stands now; raises `FarmUnavailable` if Redis cannot be reached."""
        with self._reaching():
            return self._status(task_id)

    def _status(self, task_id: str) -> TaskStatus:
        # One backend read: AsyncResult.state and .info would each fetch the meta while the job is not final.
        meta = self.app.backend.get_task_meta(task_id)
        state, info = meta["status"], meta["result"]
        if state == states.PENDING:
            return TaskStatus(task_id, "queued" if self.redis.exists(job_key(task_id)) else "unknown")
        if state == states.STARTED:
            return TaskStatus(task_id, "started")
        if state == "PROGRESS" and isinstance(info, dict):
            return TaskStatus(task_id, "progress", step=info.get("step"), total=info.get("total"))
        manifest = self._manifest(task_id, info if state == states.SUCCESS else None)
        if state == states.SUCCESS and manifest is not None:
            return TaskStatus(
                task_id, manifest.status, manifest.steps_completed, manifest.steps_planned, manifest=manifest
            )
        if state == states.REVOKED:
            step, total = (manifest.steps_completed, manifest.steps_planned) if manifest else (None, None)
            return TaskStatus(task_id, "revoked", step, total, manifest=manifest)
        if state == states.FAILURE:
            error = manifest.error if manifest and manifest.error else f"{type(info).__name__}: {info}"
            return TaskStatus(task_id, "failed", manifest=manifest, error=error)
        return TaskStatus(task_id, "started")  # RETRY, RECEIVED, or a state this client does not know yet

    def _manifest(self, task_id: str, result: Any) -> Manifest | None:
        if isinstance(result, dict):
            return Manifest.model_validate(result)
        data = self.redis.get(manifest_key(task_id))
        return Manifest.model_validate_json(data) if data else None

    def follow(self, task_id: str, *, interval: float = 0.25, timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yield the job's status each time it changes, ending with its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: TaskStatus | None = None
        while True:
            current = self.status(task_id)
            if current != last:
                yield current
                last = current
            if current.done:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"task {task_id} is still {current.state} after {timeout} s")
            time.sleep(interval)

    def wait(self, task_id: str, timeout: float | None = None, *, interval: float = 0.25) -> Manifest:
        """Block until the job is final; return its manifest (`RenderFailed` if it failed without one)."""
        *_, final = self.follow(task_id, interval=interval, timeout=timeout)
        if final.manifest is not None:
            return final.manifest
        raise RenderFailed(f"task {task_id} {final.state}: {final.error or 'no manifest was recorded'}")

    # -- revoking -------------------------------------------------------------------------------------

    def revoke(self, task_id: str) -> RevokeOutcome:
        """Stop a job wherever it is: never started if queued, at the next step if running. A no-op when final."""
        current = self.status(task_id)
        if current.done:
            return "already-finished"
        if current.state == "unknown":
            return "unknown"
        with self._reaching():
            self.redis.set(revoked_key(task_id), json.dumps({"at": time.time()}), ex=self.settings.revoke_ttl)
            self.app.control.revoke(task_id)
        return "revoked"

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    # -- the fleet ------------------------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """The live workers, by hostname: models served and loaded, loads, the job in hand and its step, last seen."""
        with self._reaching():
            return live_workers(self.redis)

    def queue_lengths(self, models: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """Jobs waiting per model and priority; `models` defaults to those the live workers serve."""
        names = served_by(self.workers()) if models is None else models
        with self._reaching():
            return queue_lengths(self.redis, self.settings.queue, names)
