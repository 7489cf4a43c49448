"""Per-job control through Redis, as three step hooks: the lease that keeps two workers off one job (a flag
its renewal thread keeps), the revocation check (a flag `RevocationWatch` keeps from pushed revocations and
the revocation keys), and the throttled progress report. No step waits on Redis.

Redis trouble fails **open**: the render goes on, the threads retry, and a warning is logged once. A Redis
blip must not throw away a GPU-hour of work; the price is that a revoke sent during an outage takes effect
when Redis answers again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Unpack

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from producer.keys import (
    LEASE_DEADLINES,
    RUNNING_TASKS,
    active_list,
    job_key,
    lease_key,
    revocations_channel,
    revoked_key,
)
from producer.records import Revocation
from producer.redis_connect import SentinelOptions, connect
from worker.engine.stops import JobRevoked, LeaseLost
from worker.hooks import StepInfo

log = logging.getLogger(__name__)

# Take the lease and record the job as running in one step, so a scanner never sees one without the other;
# the job's id also goes on its queue's active list (`active_list`), which autoscalers count, and its lease's
# deadline (server time) on `render:lease-deadlines`, which the recovery scan reads; and the job's record names the
# worker (`worker`), where a revoke pushes its notice (a tenant's producer may read its jobs' records, not the
# running records of every tenant).
_DEADLINE = "local t = redis.call('time') local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]) "
_ACQUIRE = (
    "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
    + _DEADLINE
    + "redis.call('zadd', KEYS[4], at, ARGV[3]) "
    "redis.call('hset', KEYS[2], ARGV[3], ARGV[4]) redis.call('rpush', KEYS[3], ARGV[3]) "
    "if redis.call('exists', KEYS[5]) == 1 then redis.call('hset', KEYS[5], 'worker', ARGV[5]) end "
    "return 1 end return 0"
)
# Renew only while we still hold it: a lease that expired and was taken by another worker stays theirs.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then " + _DEADLINE + "redis.call('zadd', KEYS[2], at, ARGV[3]) "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('hdel', KEYS[2], ARGV[2]) "
    "redis.call('lrem', KEYS[3], 1, ARGV[2]) redis.call('zrem', KEYS[4], ARGV[2]) "
    "return redis.call('del', KEYS[1]) end return 0"
)


def control_client(url: str, *, timeout: float = 2.0, **sentinel: Unpack[SentinelOptions]) -> redis.Redis:
    """A Redis client for per-step checks: short timeouts, no retries (redis-py's default retries for seconds).
    `sentinel`: `master_name` and `sentinel_password` for a `sentinel://` URL (`producer.redis_connect`)."""
    return connect(url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0), **sentinel)


def patient_client(url: str, **sentinel: Unpack[SentinelOptions]) -> redis.Redis:
    """A Redis client for the writes that end a job: it rides through a Redis restart (or a Sentinel failover)
    of up to about 30 s (10 retries, 0.2 s doubling to 5 s) rather than lose a finished job's state."""
    return connect(
        url,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.2), 10),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **sentinel,
    )


class Lease:
    """`render:lease:<task_id>`, held by one worker while it renders, renewed by a thread every ttl/3.

    A thread rather than the step callback renews it, because loading a model and decoding take
    minutes on real checkpoints and have no step callbacks. `lost` is set once the lease is no longer
    ours: renewal found another holder or no key, or Redis did not answer for a whole ttl (the key has
    expired there, and the recovery scanner may have handed the job to another worker). The step hook
    then stops the render, so two workers never render one job at once for more than about a step.
    """

    def __init__(
        self, client: redis.Redis, task_id: str, ttl: float, owner: str, *, renew_client: redis.Redis | None = None
    ) -> None:
        self.client = client
        self.renew_client = renew_client or client  # fast-failing, so a lost lease is noticed within its ttl
        self.task_id = task_id
        self.key = lease_key(task_id)
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{owner}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()
        self._renewed_at = 0.0
        self.active = active_list(None)

    def acquire(self, record: dict[str, Any], *, renewing: bool = True) -> bool:
        """Take the lease if nobody holds it and record the job in `render:running` and on the active list of its
        `record["queue"]`; start renewing it (unless not `renewing`: the caller calls `renew`, as a benchmark's
        simulated fleet does). The record names this run by its lease token (`lease`), which the recovery scan
        counts a death by."""
        self.active = active_list(record.get("queue"))
        keys = (self.key, RUNNING_TASKS, self.active, LEASE_DEADLINES, job_key(self.task_id))
        record = {**record, "lease": self.token}
        args = (self.token, self.ttl_ms, self.task_id, json.dumps(record), record.get("worker", ""))
        taken = self.client.eval(_ACQUIRE, 5, *keys, *args)
        if not taken:
            return False
        self._renewed_at = time.monotonic()
        if not renewing:
            return True
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.renew():
                    self._lose("it is held by another worker or expired")
                    return
                self._renewed_at = time.monotonic()
            except redis.RedisError as exc:
                if time.monotonic() - self._renewed_at >= self.ttl_ms / 1000:
                    self._lose(f"Redis did not answer for a whole lease ttl ({exc})")
                    return
                log.warning("could not renew lease %s (retrying): %s", self.key, exc)

    def renew(self) -> bool:
        """One renewal (the renewing thread's): False once the lease is not ours any more."""
        keys = (self.key, LEASE_DEADLINES)
        return bool(self.renew_client.eval(_RENEW, 2, *keys, self.token, self.ttl_ms, self.task_id))

    def check(self, steps_completed: int) -> None:
        """Raise `LeaseLost` once the lease is no longer ours; called at every step and before the upload."""
        if self.lost.is_set():
            raise LeaseLost(steps_completed, self.key)

    def on_step(self, info: StepInfo) -> None:
        """The lease as a step hook: a flag read, no Redis round trip (the renewal thread sets it)."""
        self.check(info.steps_completed)

    def _lose(self, why: str) -> None:
        log.error("lease %s was lost: %s; this worker stops the job and writes nothing", self.key, why)
        self.lost.set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            keys = (self.key, RUNNING_TASKS, self.active, LEASE_DEADLINES)
            self.client.eval(_RELEASE, 4, *keys, self.token, self.task_id)
        except redis.RedisError as exc:
            log.warning("could not release lease %s (it expires by itself): %s", self.key, exc)


def _revoked_at(value: Any) -> float | None:
    """When a revocation was written: the `at` of its key's value or its notice, if it has one."""
    revocation = Revocation.read(value)
    return revocation.at if revocation is not None else None


class RevocationCheck:
    """A step hook: stop the job at the end of the step in flight once its revocation is known here.

    The flag is set by `RevocationWatch` (pushed, or read from the key by its thread) or by `read` on the job's
    own thread: a step reads a flag and never waits on Redis.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.key = revoked_key(task_id)
        self._revoked = threading.Event()
        self._step_ends: list[float] = []
        self.revoked_at: float | None = None

    def mark(self, revoked_at: float | None) -> None:
        if not self._revoked.is_set():
            self.revoked_at = revoked_at
            self._revoked.set()

    def found(self, value: Any) -> None:
        """`value` is what the revocation key (or a pushed notice) holds; None: not revoked."""
        if value is not None:
            self.mark(_revoked_at(value))

    def read(self, client: redis.Redis) -> bool:
        """Read the revocation key now (one GET); whether the job is revoked."""
        self.found(client.get(self.key))
        return self.is_revoked()

    def is_revoked(self) -> bool:
        return self._revoked.is_set()

    def on_step(self, info: StepInfo) -> None:
        self._step_ends.append(time.time())
        if self._revoked.is_set():
            raise JobRevoked(
                info.steps_completed, revoked_at=self.revoked_at, steps_after_revoke=self.steps_after_revoke()
            )

    def steps_after_revoke(self) -> int | None:
        """How many steps ended after the revoke was written (its latency in steps)."""
        if self.revoked_at is None:
            return None
        return sum(1 for end in self._step_ends if end > self.revoked_at)


class RevocationWatch:
    """The revocations of the jobs this worker process holds, pushed by Redis and kept as local flags.

    `revoke` sets `render:revoked:<id>`, then publishes the id on the channel of the worker that the job's record
    in `render:running` names (`render:revocations:<host:pid>`, written with the lease). This process subscribes to
    its channel once, on this thread and its own connection. A job thread `watch`es its job before it takes the
    lease and `read`s the key once after: a revoke that read the record before the lease was taken had already
    set the key, and one that read it after is published here.

    The key stays the durable record, read by this thread in one MGET for every job watched after each
    (re)subscription and every `poll` seconds: a message lost to a dropped connection costs at most `poll`
    seconds, never the revoke. Redis trouble fails open (rendering goes on; one warning per outage) and the
    thread reconnects every `backoff` seconds. Redis cost per worker: one subscription, one MGET per `poll`,
    nothing per step.
    """

    def __init__(self, client: redis.Redis, owner: str, *, poll: float = 2.0, backoff: float = 1.0) -> None:
        self.client = client
        self.channel = revocations_channel(owner)
        self.poll = poll
        self.backoff = backoff
        self._checks: dict[str, RevocationCheck] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.subscribed = threading.Event()  # set while the subscription is live
        self._thread = threading.Thread(target=self._run, name="render-revocations", daemon=True)

    def start(self) -> RevocationWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def watch(self, task_id: str) -> RevocationCheck:
        """The job's step hook, kept up to date from now until `forget`."""
        check = RevocationCheck(task_id)
        with self._lock:
            self._checks[task_id] = check
        return check

    def forget(self, check: RevocationCheck) -> None:
        with self._lock:
            if self._checks.get(check.task_id) is check:
                del self._checks[check.task_id]

    def read_all(self) -> None:
        """Read the key of every job watched, in one MGET (raises Redis errors)."""
        with self._lock:
            checks = [check for check in self._checks.values() if not check.is_revoked()]
        if not checks:
            return
        for check, value in zip(checks, self.client.mget([check.key for check in checks]), strict=True):
            check.found(value)

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
            try:
                self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                if not warned:
                    log.warning(
                        "revocation channel %s unreachable (rendering on; a revoke applies once it is back, retried "
                        "every %.1f s): %s",
                        self.channel,
                        self.backoff,
                        exc,
                    )
                    warned = True
                self._stop.wait(self.backoff)
                continue
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
            warned = False

    def _listen(self, pubsub: Any) -> None:
        pubsub.subscribe(self.channel)
        while (message := pubsub.get_message(timeout=self.backoff)) is None or message["type"] != "subscribe":
            if self._stop.is_set():
                return
        # Subscribed: whatever was revoked while this thread was not listening is in the keys.
        self.subscribed.set()
        self.read_all()
        next_read = time.monotonic() + self.poll
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=max(0.0, min(1.0, next_read - time.monotonic())))
            if message is not None and message["type"] == "message":
                self._pushed(message["data"])
            if time.monotonic() >= next_read:
                self.read_all()
                next_read = time.monotonic() + self.poll
        self.subscribed.clear()

    def _pushed(self, data: Any) -> None:
        notice = Revocation.read(data)
        if notice is None or notice.task_id is None:
            log.warning("ignored a malformed revocation on %s: %r", self.channel, data)
            return
        task_id = notice.task_id
        with self._lock:
            check = self._checks.get(task_id)
        if check is not None:
            check.found(data)


class ProgressReport:
    """A step hook: `report(step, total)` at most every `interval` seconds, and always at the last step.

    In a worker `report` only posts to the job's own thread (`worker.process.gpu.ProgressBox`), which makes the Redis
    writes; a report that raises is logged and never stops the render.
    """

    def __init__(
        self, report: Callable[[int, int], None], *, interval: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.report = report
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def on_step(self, info: StepInfo) -> None:
        now = self.clock()
        if self._last is None:  # the first report comes `interval` after the steps began (STARTED says they did)
            self._last = now - info.elapsed
        if info.steps_completed >= info.steps_planned or now - self._last >= self.interval:
            self._last = now
            try:
                self.report(info.steps_completed, info.steps_planned)
            except Exception as exc:  # progress is informative; it never stops a render
                log.warning("progress report failed: %s", exc)
