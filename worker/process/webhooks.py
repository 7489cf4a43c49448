"""Webhook delivery for finished jobs: a durable outbox in Redis, and per process a daemon thread that hands due
deliveries to a small pool of delivery threads.

`enqueue` writes the delivery (`render:webhook:<task_id>`, a hash) and schedules it in `render:webhooks`
(a sorted set scored by when the next attempt is due) in one round trip, and never waits on HTTP. Any
worker may deliver any due webhook: it claims it by pushing its score `claim_seconds` ahead, so a webhook
whose sender died mid-delivery is delivered by another after that (at least once; exactly once when nothing
crashes: a late result from a superseded claim is not recorded). A process claims only as many as it has
idle delivery threads (`concurrency`), so a claim never waits in a queue while it ages.

Each POST is signed (`producer.webhooks.sign`), goes only to the addresses the SSRF guard checked at
delivery time (pinned, so DNS rebinding cannot redirect it), follows no redirect, and is retried with
exponential backoff until `max_attempts`. `timeout` bounds a whole attempt (name lookup, connection, request
and the whole answer, however slowly it trickles), so a slow receiver holds one delivery thread for at most
that long while the others deliver. A name that does not resolve at delivery is retried like a connection
error: the producer refused names that did not resolve at submit, so a lookup failing now is most often the
resolver's passing trouble (EAI_AGAIN), and even an NXDOMAIN may be a negative cache or a new name not yet
seen everywhere; `max_attempts` bounds what a name that is really gone costs.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.typing import EncodableT, FieldT

from producer.errors import SpecError
from producer.keys import WEBHOOK_OUTBOX, webhook_key
from producer.webhooks import SIGNATURE_HEADER, IPAddress, Resolver, check_webhook_url, sign
from worker.process.pinned_http import Deadline, PinnedHTTPConnection, PinnedHTTPSConnection

log = logging.getLogger(__name__)

STATE_TTL_SECONDS = 7 * 24 * 3600
"""How long a webhook's delivery state is kept after it was queued."""
BATCH = 16
"""Due webhooks read per pass."""
CONCURRENCY = 16
"""Delivery threads per process: attempts in flight at once."""
NO_SECRET = "RENDER_WEBHOOK_SECRET is not set on the worker; webhooks are only sent signed"
USER_AGENT = "render-farm-webhook"

# Claim a due delivery: push its score ahead (so no other sender takes it) and mark the hash with our token.
# A queued webhook whose hash has expired is dropped from the outbox.
_CLAIM = """
local score = redis.call('zscore', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
if redis.call('exists', KEYS[2]) == 0 then redis.call('zrem', KEYS[1], ARGV[1]) return false end
redis.call('zadd', KEYS[1], ARGV[3], ARGV[1])
redis.call('hset', KEYS[2], 'claim', ARGV[4])
return redis.call('hmget', KEYS[2], 'url', 'body', 'attempts')
"""

# Record an attempt's result if our claim still stands (not re-queued, not taken over after it lapsed).
# ARGV: task id, claim token, next due score ('' to leave the outbox), then field/value pairs.
_RECORD = """
if redis.call('hget', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('zrem', KEYS[2], ARGV[1]) else redis.call('zadd', KEYS[2], ARGV[3], ARGV[1]) end
redis.call('hdel', KEYS[1], 'claim', 'next_attempt_at', 'last_status', 'last_error')
redis.call('hset', KEYS[1], unpack(ARGV, 4))
return 1
"""


@dataclass(frozen=True)
class _Claim:
    task_id: str
    token: str
    url: str
    body: bytes
    attempt: int  # the attempt this is, from 1


@dataclass(frozen=True)
class _Outcome:
    status: int | None
    error: str | None
    final: bool = False  # no point retrying (refused URL, no secret)

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Queues webhooks in Redis and delivers due ones from a daemon thread (`start`), or one pass (`deliver_due`).

    `timeout` bounds each attempt as a whole; up to `concurrency` attempts run at once. `claim_seconds`
    (default: 60 s, or twice `timeout` when longer) must outlast an attempt. `resolve` looks names up
    (`socket.getaddrinfo`).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        secret: str | None,
        allowed_hosts: Sequence[str] = (),
        max_attempts: int = 5,
        backoff: float = 2.0,
        timeout: float = 10.0,
        claim_seconds: float | None = None,
        poll_seconds: float = 2.0,
        concurrency: int = CONCURRENCY,
        resolve: Resolver = socket.getaddrinfo,
    ) -> None:
        self.client = client
        self.secret = secret or None
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.timeout = timeout
        self.claim_seconds = claim_seconds if claim_seconds is not None else max(60.0, 2 * timeout)
        self.poll_seconds = poll_seconds
        self.concurrency = max(1, concurrency)
        self.resolve = resolve
        self._claim_script = client.register_script(_CLAIM)
        self._record_script = client.register_script(_RECORD)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._lock = threading.Lock()
        self._busy = 0  # attempts in flight on the delivery threads

    def enqueue(self, task_id: str, url: str, body: bytes) -> None:
        """Queue `body` for a POST to `url` now, in one round trip; never raises and never waits on HTTP."""
        now = time.time()
        key = webhook_key(task_id)
        fields: dict[FieldT, EncodableT] = {
            "url": url,
            "body": body,
            "state": "pending",
            "attempts": 0,
            "queued_at": now,
            "next_attempt_at": now,
        }
        try:
            queue = self.client.pipeline(transaction=True)
            queue.delete(key)  # a re-queued webhook starts afresh; a delivery in flight loses its claim
            queue.hset(key, mapping=fields)
            queue.expire(key, STATE_TTL_SECONDS)
            queue.zadd(WEBHOOK_OUTBOX, {task_id: now})
            queue.execute()
        except Exception as exc:  # a finished job must not fail because its webhook could not be queued
            log.warning("could not queue the webhook of task %s (it will not be sent): %s", task_id, exc)
            return
        self._wake.set()

    def start(self) -> None:
        """Start this process's delivery thread (again after a fork); a no-op while it runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._lock, self._busy = threading.Lock(), 0  # a fork copies neither the threads nor their attempts
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="render-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the delivery threads after the attempts in flight, waiting up to `timeout` seconds for them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def deliver_due(self, now: float | None = None) -> int:
        """Claim up to 16 deliveries due at `now` (default: the clock) and attempt them side by side (`concurrency`
        at once); return how many were attempted, once every result is recorded."""
        claims = self._claim_due(time.time() if now is None else now, BATCH)
        if claims:
            with ThreadPoolExecutor(min(len(claims), self.concurrency), thread_name_prefix="render-webhook") as pool:
                list(pool.map(lambda claim: self._deliver(claim, now), claims))
        return len(claims)

    def _claim_due(self, now: float, limit: int) -> list[_Claim]:
        claims: list[_Claim] = []
        for raw in self.client.zrangebyscore(WEBHOOK_OUTBOX, "-inf", now, start=0, num=BATCH):
            if len(claims) >= limit:
                break
            claim = self._claim(_text(raw), now)
            if claim is not None:  # else another sender took it first
                claims.append(claim)
        return claims

    def _deliver(self, claim: _Claim, now: float | None) -> None:
        outcome = self._attempt(claim)
        self._record(claim, outcome, time.time() if now is None else now)  # backoff counts from the answer

    def _claim(self, task_id: str, now: float) -> _Claim | None:
        token = uuid.uuid4().hex
        found = self._claim_script(
            keys=[WEBHOOK_OUTBOX, webhook_key(task_id)],
            args=[task_id, repr(now), repr(now + self.claim_seconds), token],
        )
        if not found:
            return None
        url, body, attempts = found
        body = body.encode() if isinstance(body, str) else bytes(body or b"")
        return _Claim(task_id, token, _text(url or b""), body, int(attempts or 0) + 1)

    def _attempt(self, claim: _Claim) -> _Outcome:
        if not self.secret:
            return _Outcome(None, NO_SECRET, final=True)
        deadline = Deadline(self.timeout)
        failed_lookups: list[socket.gaierror] = []

        def resolve(host: str, port: int, family: int, kind: int) -> Sequence[tuple[Any, ...]]:
            try:
                return self.resolve(host, port, family, kind)
            except socket.gaierror as exc:
                failed_lookups.append(exc)
                raise

        try:
            addresses = check_webhook_url(claim.url, self.allowed_hosts, resolve=resolve)
            return self._post(claim, addresses, self.secret, deadline)
        except SpecError as exc:
            if failed_lookups:  # the guard refused a name that did not resolve: retried (see the module's notes)
                reason = failed_lookups[-1].strerror or str(failed_lookups[-1])
                return _Outcome(None, f"could not resolve {urlsplit(claim.url).hostname} ({reason})")
            return _Outcome(None, f"refused: {exc}", final=True)
        except TimeoutError:
            return _Outcome(None, f"timed out after {self.timeout:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return _Outcome(None, f"could not deliver: {type(exc).__name__}: {exc}".rstrip(": "))
        except Exception as exc:  # never leave a claim to lapse and repeat forever: count it as a failed attempt
            log.exception("webhook of task %s failed unexpectedly", claim.task_id)
            return _Outcome(None, f"unexpected error: {type(exc).__name__}: {exc}")

    def _post(self, claim: _Claim, addresses: list[IPAddress], secret: str, deadline: Deadline) -> _Outcome:
        parts = urlsplit(claim.url)
        host = parts.hostname or ""
        left = deadline.left()  # the name lookup spent some of it
        connection: http.client.HTTPConnection
        if parts.scheme.lower() == "https":
            connection = PinnedHTTPSConnection(host, parts.port or 443, addresses=addresses, timeout=left)
        else:
            connection = PinnedHTTPConnection(host, parts.port or 80, addresses=addresses, timeout=left)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Render-Task-Id": claim.task_id,
            "X-Render-Delivery-Attempt": str(claim.attempt),
            SIGNATURE_HEADER: sign(secret, claim.body),
        }
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            connection.request("POST", path, body=claim.body, headers=headers)
            response = connection.getresponse()
            response.read(65536)  # the receiver's answer is not used; read a little so it is not cut off mid-write
        finally:
            connection.close()
        if 200 <= response.status < 300:
            return _Outcome(response.status, None)
        error = f"the receiver answered {response.status} {response.reason}".rstrip()
        if 300 <= response.status < 400:
            error += f" (redirect to {response.getheader('Location', '?')} not followed)"
        return _Outcome(response.status, error)

    def _record(self, claim: _Claim, outcome: _Outcome, now: float) -> bool:
        fields: dict[str, Any] = {"attempts": claim.attempt}
        if outcome.status is not None:
            fields["last_status"] = outcome.status
        if outcome.error:
            fields["last_error"] = outcome.error
        due = ""
        if outcome.delivered:
            fields.update(state="delivered", delivered_at=now)
        elif outcome.final or claim.attempt >= self.max_attempts:
            fields["state"] = "failed"
            log.warning(
                "webhook of task %s failed after %d attempt(s): %s", claim.task_id, claim.attempt, outcome.error
            )
        else:
            due = repr(now + self.backoff * 2 ** (claim.attempt - 1))
            fields.update(state="retrying", next_attempt_at=due)
        pairs = [str(part) for pair in fields.items() for part in pair]
        recorded = self._record_script(
            keys=[webhook_key(claim.task_id), WEBHOOK_OUTBOX], args=[claim.task_id, claim.token, due, *pairs]
        )
        if not recorded:
            log.info(
                "webhook of task %s was re-queued or taken over during delivery; result not recorded", claim.task_id
            )
        return bool(recorded)

    def _loop(self) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="render-webhook") as pool:
            while not self._stop.is_set():
                self._wake.clear()  # before looking, so that a wake-up while we look is not lost
                wait = self.poll_seconds
                try:
                    wait = self._dispatch(pool)
                    if self._failing:
                        log.warning("webhook delivery reaches Redis again")
                    self._failing = False
                except Exception as exc:  # the thread outlives any outage; deliveries wait in Redis meanwhile
                    if not self._failing:
                        log.warning("webhook delivery failed (retrying every %.1f s): %s", self.poll_seconds, exc)
                    self._failing = True
                self._wake.wait(wait)
        # Leaving the pool waits for the attempts in flight, each bounded by `timeout`.

    def _dispatch(self, pool: ThreadPoolExecutor) -> float:
        """Hand due deliveries to idle delivery threads; return how long to wait before looking again."""
        idle = self.concurrency - self._busy
        if idle > 0:
            for claim in self._claim_due(time.time(), idle):
                with self._lock:
                    self._busy += 1
                pool.submit(self._deliver, claim, None).add_done_callback(self._delivered)
        if self._busy >= self.concurrency:
            return self.poll_seconds  # a delivery that ends wakes the loop
        return self._until_next_due()

    def _delivered(self, done: Future[None]) -> None:
        with self._lock:
            self._busy -= 1
        error = done.exception()
        if error is not None:  # its claim lapses and the webhook is tried again after claim_seconds
            log.warning("could not record a webhook delivery: %s", error)
        self._wake.set()

    def _until_next_due(self) -> float:
        first = self.client.zrange(WEBHOOK_OUTBOX, 0, 0, withscores=True)
        if not first:
            return self.poll_seconds
        return max(0.0, min(self.poll_seconds, float(first[0][1]) - time.time()))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
