"""`RenderClient`: submit, follow, revoke and fetch render jobs. Imports no torch, no diffusers, no worker."""

from __future__ import annotations

import contextlib
import copy
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from celery import Celery, states
from celery.exceptions import TaskRevokedError

from producer import admission, batch, joblist, queued, tenants, unsent
from producer.batch import BatchHandle
from producer.batch import load_handle as batch_handle
from producer.celery_config import base_config
from producer.errors import NoWorkerForModel, RenderFailed, SpecError, UnknownTenant, WaitTimeout
from producer.fleet import WorkerInfo, live_workers, served_by, served_models, summed, tenant_queue_lengths
from producer.keys import (
    DEFAULT_PRIORITY,
    DEFAULT_TENANT,
    PRIORITIES,
    Priority,
    check_task_id,
    check_tenant,
    job_key,
    manifest_key,
    model_queue,
    revocations_channel,
    revoked_key,
    scoped_id,
    tenant_of,
    tenant_queue,
    unscoped,
)
from producer.manifest import Manifest
from producer.reaching import reaching
from producer.reaching import redacted as redacted
from producer.records import PROGRESS_STATE, Progress, Revocation, TaskMessage, text
from producer.redis_connect import connect
from producer.settings import ClientSettings
from producer.spec import RenderSpec
from producer.status import TERMINAL as TERMINAL
from producer.status import State as State
from producer.status import TaskStatus as TaskStatus

RevokeOutcome = Literal["revoked", "already-finished", "unknown"]


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


_STATUS_CHUNK = 500
_SUBMIT_CHUNK = 500


def _as_line(spec: RenderSpec | dict[str, Any] | str) -> str:
    if isinstance(spec, RenderSpec):
        return spec.model_dump_json()
    return spec if isinstance(spec, str) else json.dumps(spec)


def _from_meta(task_id: str, state: str, info: Any, manifest: Manifest | None) -> TaskStatus:
    """A job's status from its Celery state and result (and its manifest, once final); never PENDING here."""
    if state == states.STARTED:
        return TaskStatus(task_id, "started")
    if state == PROGRESS_STATE and isinstance(info, dict):
        progress = Progress.from_meta(info)
        if progress is None:
            return TaskStatus(task_id, "progress")
        return TaskStatus(task_id, "progress", progress.step, progress.total, frame=progress.frame)
    if state == states.SUCCESS and manifest is not None:  # succeeded, interrupted, or expired (with its error)
        return TaskStatus(
            task_id,
            manifest.status,
            manifest.steps_completed,
            manifest.steps_planned,
            manifest=manifest,
            error=manifest.error,
        )
    if state == states.REVOKED:
        step, total = (manifest.steps_completed, manifest.steps_planned) if manifest else (None, None)
        return TaskStatus(task_id, "revoked", step, total, manifest=manifest)
    if state == states.FAILURE:
        error = manifest.error if manifest and manifest.error else f"{type(info).__name__}: {info}"
        return TaskStatus(task_id, "failed", manifest=manifest, error=error)
    return TaskStatus(task_id, "started")  # RETRY, RECEIVED, or a state this client does not know yet


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
        sentinel = self.settings.sentinel
        self.app.conf.update(
            base_config(url, queue=self.settings.queue, result_ttl=self.settings.result_ttl, **sentinel)
        )
        self.redis = connect(url, socket_connect_timeout=5, socket_timeout=10, **sentinel)
        self.tenant = self.settings.tenant

    def as_tenant(self, tenant: str) -> RenderClient:
        """This client, submitting and reading as `tenant` (the HTTP service's per-key view); shares the connections.
        Submits check that the farm declares the tenant (`UnknownTenant`)."""
        view = copy.copy(self)
        view.tenant = check_tenant(tenant, "tenant")
        return view

    def owns(self, task_id: str) -> bool:
        """Whether this client may read and revoke `task_id`: a tenant's client its own jobs only; the default
        tenant's (the farm operator's) every job."""
        return self.tenant == DEFAULT_TENANT or tenant_of(task_id) == self.tenant

    # -- submitting -----------------------------------------------------------------------------------

    def submit(
        self,
        spec: RenderSpec | dict[str, Any] | str,
        task_id: str | None = None,
        queue: str | None = None,
        *,
        priority: Priority = DEFAULT_PRIORITY,
        wait_for_worker: bool = False,
        idempotency_key: str | None = None,
    ) -> JobHandle:
        """Validate `spec` and enqueue it for its model's workers; see `submit_many`.

        With `idempotency_key`, a submit repeated with the same key, spec and priority returns the job the first one
        made and enqueues nothing; with another spec or priority it raises `IdempotencyConflict` (see
        `producer.admission`). The key is remembered for RENDER_RESULT_TTL.
        """
        if task_id is not None:
            check_task_id(task_id)  # an empty or blank id is refused, not replaced
        if idempotency_key is not None:
            return self._submit_once(spec, task_id, queue, priority, wait_for_worker, idempotency_key)
        return self.submit_many(
            [spec],
            task_ids=None if task_id is None else [task_id],
            queue=queue,
            priority=priority,
            wait_for_worker=wait_for_worker,
        )[0]

    def _submit_once(
        self,
        spec: RenderSpec | dict[str, Any] | str,
        task_id: str | None,
        queue: str | None,
        priority: Priority,
        wait_for_worker: bool,
        key: str,
    ) -> JobHandle:
        admission.check_key(key)
        if priority not in PRIORITIES:
            raise SpecError(f"priority: must be one of {', '.join(PRIORITIES)}; got {priority!r}")
        parsed = _coerce_spec(spec)
        body = admission.body_digest(parsed, priority)
        new_id = scoped_id(self.tenant, task_id or uuid.uuid4().hex)
        with self._reaching():
            # A replay is answered before any check: the job exists, whatever the queue or the fleet is like now.
            found = admission.earlier(self.redis, key, body, self.tenant)
            found = found or admission.claim(
                self.redis, key, body, new_id, ttl=self.settings.result_ttl, tenant=self.tenant
            )
        if found is not None:
            return JobHandle(found, self)
        try:
            return self.submit_many(
                [parsed], task_ids=[new_id], queue=queue, priority=priority, wait_for_worker=wait_for_worker
            )[0]
        except BaseException:
            with contextlib.suppress(redis.RedisError):
                admission.release(self.redis, key, new_id, self.tenant)
            raise

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
        With RENDER_MAX_QUEUED set, jobs that would make a model's queue longer than that raise `QueueFull`, and
        nothing is enqueued.
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
        ids = [scoped_id(self.tenant, task_id) for task_id in ids]
        queues = [queue or model_queue(self.settings.queue, spec.model) for spec in parsed]
        self._check_webhooks({spec.webhook for spec in parsed if spec.webhook})
        with self._reaching():
            if not wait_for_worker:
                self._check_served(sorted({spec.model for spec in parsed}))
            parsed = self._admit(parsed, queues)
            return self._enqueue(parsed, ids, queues, PRIORITIES[priority])

    def _admit(self, parsed: list[RenderSpec], queues: list[str]) -> list[RenderSpec]:
        """The farm's checks of a submit of `parsed` to `queues` (base queue names), before anything is enqueued:
        the tenant is declared (`UnknownTenant`), within its `max_queued` (`QuotaExceeded`), each model's queue
        within RENDER_MAX_QUEUED (`QueueFull`). Returns the specs with the tenant's default deadline where they set
        none. One round trip, two with a quota, three with both bounds."""
        declared = tenants.declared(self.redis)
        config = declared.get(self.tenant)
        if config is None:
            raise UnknownTenant(self.tenant, sorted(declared))
        if config.max_queued is not None:
            served = [model_queue(self.settings.queue, model) for model in served_by(live_workers(self.redis))]
            tenants.check_quota(self.redis, self.tenant, config, [*queues, *served], len(parsed))
        models = [spec.model for spec in parsed]
        admission.check_room(self.redis, self.settings.max_queued, queues, models, sorted(declared))
        if config.deadline_seconds is None:
            return parsed
        return [
            spec
            if spec.deadline_seconds is not None
            else spec.model_copy(update={"deadline_seconds": config.deadline_seconds})
            for spec in parsed
        ]

    def submit_batch(
        self,
        specs: Iterable[RenderSpec | dict[str, Any] | str],
        *,
        name: str,
        priority: Priority = DEFAULT_PRIORITY,
        wait_for_worker: bool = False,
        webhook: str | None = None,
        source: str = "python",
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> BatchHandle:
        """Submit `specs` as the batch `name`, or resume it: see `producer.batch`. A dict may carry `task_id`;
        a string is one JSON line. Every spec is validated first (`BatchFileError` lists every bad one and nothing
        is sent). Enqueued in pipelined chunks of 500; `on_chunk(sent, total)` after each. `webhook` applies to
        specs without their own. The handle's `counts` say what was new, skipped, left alone, and resubmitted.
        """
        if priority not in PRIORITIES:
            raise SpecError(f"priority: must be one of {', '.join(PRIORITIES)}; got {priority!r}")
        lines = [_as_line(spec) for spec in specs]
        parsed = [
            replace(line, task_id=scoped_id(self.tenant, line.task_id))
            for line in batch.parse_lines(lines, name=name, webhook=webhook)
        ]
        self._check_webhooks({line.spec.webhook for line in parsed if line.spec.webhook})
        with self._reaching():
            known = self.redis.hgetall(batch.batch_tasks_key(name, self.tenant))
            previous = {int(k): text(v) for k, v in known.items()}
            run = int(self.redis.hget(batch.batch_key(name, self.tenant), "runs") or 0) + 1
        found = self.statuses([previous.get(line.line, line.task_id) for line in parsed])
        todo, current, counts = batch.plan(parsed, previous, found, run)
        with self._reaching():
            if todo and not wait_for_worker:
                self._check_served(sorted({line.spec.model for line in todo}))
            admitted = self._admit(
                [line.spec for line in todo], [model_queue(self.settings.queue, line.spec.model) for line in todo]
            )
            todo = [replace(line, spec=spec) for line, spec in zip(todo, admitted, strict=True)]
            batch.record(self, name, source, current, run)
            again = [line.task_id for line in todo if line.task_id in previous.values()]
            if again:  # a failed or lost job submitted under its old id: its old outcome must not show
                clear = self.redis.pipeline(transaction=False)
                for task_id in again:
                    clear.delete(
                        revoked_key(task_id), manifest_key(task_id), self.app.backend.get_key_for_task(task_id)
                    )
                clear.execute()
            for start in range(0, len(todo), _SUBMIT_CHUNK):
                chunk = todo[start : start + _SUBMIT_CHUNK]
                queues = [model_queue(self.settings.queue, line.spec.model) for line in chunk]
                self._enqueue(
                    [line.spec for line in chunk], [line.task_id for line in chunk], queues, PRIORITIES[priority]
                )
                if on_chunk is not None:
                    on_chunk(start + len(chunk), len(todo))
        handle = BatchHandle(self, name, [line.line for line in current], [line.task_id for line in current])
        handle.counts = counts
        return handle

    def batch(self, name: str) -> BatchHandle:
        """The handle of a batch submitted before (by any process), from its record in Redis."""
        return batch.load_handle(self, name)

    def _check_webhooks(self, urls: set[str]) -> None:
        """Refuse a webhook that is not http(s), or reaches a private, loopback or link-local address not listed
        in RENDER_WEBHOOK_HOSTS (`SpecError`), before anything is enqueued; workers check again when they POST."""
        if not urls:
            return
        from producer.webhooks import check_webhook_url

        for url in sorted(urls):
            check_webhook_url(url, self.settings.webhook_hosts)

    def _check_served(self, models: list[str]) -> None:
        """Raise `NoWorkerForModel` for the first model no live worker serves: one Redis round trip when all are."""
        for model, count in served_models(self.redis, models, ttl=self.settings.heartbeat_ttl).items():
            if not count:
                raise NoWorkerForModel(model, served_by(live_workers(self.redis)))

    def _enqueue(self, parsed: list[RenderSpec], ids: list[str], queues: list[str], priority: int) -> list[JobHandle]:
        now = time.time()
        messages = [
            TaskMessage(task_id, spec.model_dump_json(), tenant_queue(queue, self.tenant), priority, now)
            for task_id, spec, queue in zip(ids, parsed, queues, strict=True)
        ]
        # Records and messages-to-send in one transaction, then the sends: a submitter that dies in between leaves
        # its messages for the workers' recovery scan to send (producer.unsent), never a record without a message.
        deadlines = [spec.deadline_seconds for spec in parsed]
        unsent.stage(self.redis, messages, record_ttl=self.settings.result_ttl, tenant=self.tenant, deadlines=deadlines)
        with self.app.producer_or_acquire() as producer, producer.batch():
            for message in messages:
                message.send(self.app, producer=producer)
        unsent.sent(self.redis, messages, self.tenant)
        return [JobHandle(task_id, self) for task_id in ids]

    # -- asking ---------------------------------------------------------------------------------------

    def _reaching(self) -> contextlib.AbstractContextManager[None]:
        """Turn the many ways Redis can be away (redis-py, kombu, Celery's backend) into one clear error."""
        return reaching(self.settings.redis_url)

    def status(self, task_id: str) -> TaskStatus:
        """Where the job stands now; raises `FarmUnavailable` if Redis cannot be reached."""
        with self._reaching():
            return self._status(task_id)

    def _status(self, task_id: str) -> TaskStatus:
        return self._statuses([task_id])[0]

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """Many jobs' statuses, in order, in about two pipelined round trips per 500 jobs (a batch's display)."""
        with self._reaching():
            found: list[TaskStatus] = []
            for start in range(0, len(task_ids), _STATUS_CHUNK):
                found += self._statuses(task_ids[start : start + _STATUS_CHUNK])
            return found

    def _statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        # One MGET of the result metas, then one pipeline for what the metas leave open: whether a pending job
        # is queued (its job record) and the manifest of a revoked or failed one.
        if not all(self.owns(task_id) for task_id in task_ids):  # another tenant's job is none of this client's
            mine = [task_id for task_id in task_ids if self.owns(task_id)]
            known = dict(zip(mine, self._statuses(mine), strict=True)) if mine else {}
            return [known.get(task_id) or TaskStatus(task_id, "unknown") for task_id in task_ids]
        backend = self.app.backend
        raws = self.redis.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        metas = [backend.decode_result(raw) if raw else {"status": states.PENDING, "result": None} for raw in raws]
        lookups = self.redis.pipeline(transaction=False)
        for task_id, meta in zip(task_ids, metas, strict=True):
            if meta["status"] == states.PENDING:
                lookups.hget(job_key(task_id), "queue")
            elif meta["status"] in (states.SUCCESS, states.REVOKED, states.FAILURE) and not isinstance(
                meta["result"], dict
            ):
                lookups.get(manifest_key(task_id))
        answers = iter(lookups.execute())
        found: list[TaskStatus] = []
        queues: dict[int, str] = {}  # a queued job's place in `found` -> the queue its record names
        for task_id, meta in zip(task_ids, metas, strict=True):
            state, info = meta["status"], meta["result"]
            if state == states.PENDING:
                queue = next(answers)
                if queue is not None:
                    queues[len(found)] = text(queue)
                found.append(TaskStatus(task_id, "queued" if queue is not None else "unknown"))
                continue
            manifest = None
            if isinstance(info, dict) and state in (states.SUCCESS, states.REVOKED, states.FAILURE):
                manifest = Manifest.model_validate(info)
            elif state in (states.SUCCESS, states.REVOKED, states.FAILURE):
                data = next(answers)
                manifest = Manifest.model_validate_json(data) if data else None
            found.append(_from_meta(task_id, state, info, manifest))
        if queues:
            self._explain_waiting(found, queues)
        return found

    def _explain_waiting(self, found: list[TaskStatus], queues: dict[int, str]) -> None:
        """Say, on each queued job of `found` whose model no live worker serves, that it waits for one (two round
        trips, whatever the number of jobs)."""
        served = {model_queue(self.settings.queue, model) for model in served_by(live_workers(self.redis))}
        prefix = f"{self.settings.queue}."
        for index, queue in queues.items():
            queue = unscoped(queue)
            if queue.startswith(prefix) and queue not in served:
                found[index] = replace(found[index], waiting=f"no live worker serves {queue.removeprefix(prefix)}")

    def jobs(
        self,
        *,
        batch: str | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[TaskStatus], str | None]:
        """A page of the jobs submitted (the newest 100,000, for RENDER_RESULT_TTL), newest first, with the cursor
        of the next page (None: no more). `batch`: only that batch's jobs; `status`: only jobs in that state;
        `limit`: 1-1000 per page. See `producer.joblist`."""
        ids = batch_handle(self, batch).task_ids if batch is not None else None
        with self._reaching():
            return joblist.list_jobs(self, batch_ids=ids, status=status, limit=limit, cursor=cursor)

    def follow(self, task_id: str, *, interval: float = 0.25, timeout: float | None = None) -> Iterator[TaskStatus]:
        """Yield the job's status each time it changes, ending with its final status.

        The result backend publishes every state change (started, progress, final) on the task's channel;
        following wakes on that at once, and reads the status at least every `interval` seconds without it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: TaskStatus | None = None
        with self._changes(task_id) as changed:
            while True:
                current = self.status(task_id)
                if current != last:
                    yield current
                    last = current
                if current.done:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"task {task_id} is still {current.state} after {timeout} s")
                changed(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    @contextlib.contextmanager
    def _changes(self, task_id: str) -> Iterator[Callable[[float], None]]:
        """A wait of at most N seconds that ends early when the task's result meta is published.

        One subscription for as long as a caller follows the job (none for jobs only submitted). If Redis
        cannot give one, the wait is a plain sleep: following still works, by reading every `interval`.
        """
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.app.backend.get_key_for_task(task_id))
        except redis.RedisError:
            pubsub.close()
            yield time.sleep
            return

        def wait(seconds: float) -> None:
            try:
                pubsub.get_message(timeout=seconds)
            except redis.RedisError:
                time.sleep(seconds)

        try:
            yield wait
        finally:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

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
            self._mark_revoked_keys([task_id])
            self.app.control.revoke(task_id)
        return "revoked"

    def webhook_delivery(self, task_id: str) -> dict[str, Any] | None:
        """The job's webhook delivery: url, state (pending, retrying, delivered, failed), attempts, last_status,
        last_error, delivered_at; None if the job has no webhook or it was never queued."""
        from producer.webhooks import delivery_state

        with self._reaching():
            return delivery_state(self.redis, task_id)

    def revoke_many(self, task_ids: Sequence[str]) -> dict[str, int]:
        """Stop every unfinished job of `task_ids`: a revocation key for each, then the queued ones are taken off
        their queues at once (state `revoked`); running ones stop at their next step. Returns counts: `dequeued`,
        `stopping` (rendering, or held by a worker about to start), `finished` (left untouched), `unknown`.

        Unlike `revoke`, no Celery broadcast: the key already stops a job at start, and a broadcast id stays
        refused by every worker for hours, which a batch run again must be able to submit.
        """
        found = self.statuses(task_ids)
        unfinished = [s.task_id for s in found if not s.done and s.state != "unknown"]
        counts = {
            "dequeued": 0,
            "stopping": 0,
            "finished": sum(s.done for s in found),
            "unknown": sum(s.state == "unknown" for s in found),
        }
        if not unfinished:
            return counts
        with self._reaching():
            queues = {text(q) for q in self._mark_revoked_keys(unfinished) if q}
            removed = self._dequeue(queues, set(unfinished))
            self._mark_revoked(removed)
        counts["dequeued"] = len(removed)
        counts["stopping"] = len(unfinished) - len(removed)
        return counts

    def _mark_revoked_keys(self, task_ids: Sequence[str]) -> list[Any]:
        """Set each job's revocation key, then tell the worker rendering it (its record in `render:running`) on that
        worker's pub/sub channel, so the job's step reads a flag instead of asking Redis. Returns each job's queue.

        The key is written before the record is read: a worker that takes the job's lease after that read finds the
        key when it reads it, right after taking the lease, and one that took it before is told."""
        at = time.time()
        writes = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            writes.set(revoked_key(task_id), Revocation(at).value(), ex=self.settings.revoke_ttl)
            writes.hmget(job_key(task_id), ["queue", "worker"])
        replies = writes.execute()
        notices = self.redis.pipeline(transaction=False)
        for task_id, (_, worker) in zip(task_ids, replies[1::2], strict=True):
            if worker is not None:
                notices.publish(revocations_channel(text(worker)), Revocation(at, task_id).notice())
        if len(notices):
            notices.execute()
        return [queue for queue, _ in replies[1::2]]

    def _mark_revoked(self, task_ids: set[str]) -> None:
        """State REVOKED for jobs taken off their queue (no worker will ever see them), in one pipeline."""
        backend = self.app.backend
        reason = backend.prepare_exception(TaskRevokedError("revoked while queued"))
        done = datetime.now(UTC).isoformat()
        writes = self.redis.pipeline(transaction=False)
        for task_id in sorted(task_ids):
            meta = {"status": states.REVOKED, "result": reason, "traceback": None, "children": [], "date_done": done}
            writes.set(
                backend.get_key_for_task(task_id),
                backend.encode({**meta, "task_id": task_id}),
                ex=self.settings.result_ttl,
            )
        writes.execute()

    def _dequeue(self, queues: set[str], wanted: set[str]) -> set[str]:
        """Take the messages of `wanted` off every priority list of `queues`; return the ids really removed
        (one a worker popped meanwhile is not, and stops at start on its revocation key)."""
        return queued.dequeue(self.redis, queues, wanted)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    # -- the fleet ------------------------------------------------------------------------------------

    def workers(self) -> list[WorkerInfo]:
        """The live workers, by hostname: models served and loaded, loads, the job in hand and its step, last seen."""
        with self._reaching():
            return live_workers(self.redis)

    def queue_lengths(self, models: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """Jobs waiting per model and priority, every tenant's together; `models` defaults to those the live workers
        serve. A tenant's client counts its own jobs only."""
        return summed(self.tenant_queue_lengths(models))

    def tenant_queue_lengths(self, models: Iterable[str] | None = None) -> dict[str, dict[str, dict[str, int]]]:
        """Jobs waiting per tenant, model and priority: every declared tenant's, or a tenant's client's own."""
        names = served_by(self.workers()) if models is None else models
        tenants = None if self.tenant == DEFAULT_TENANT else [self.tenant]
        with self._reaching():
            return tenant_queue_lengths(self.redis, self.settings.queue, names, tenants)
