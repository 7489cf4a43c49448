"""Webhook delivery for finished jobs: a durable outbox in Redis and one daemon delivery thread per process.

`enqueue` writes the delivery (`render:webhook:<task_id>`, a hash) and schedules it in `render:webhooks`
(a sorted set scored by when the next attempt is due) in one round trip, and never waits on HTTP. Any
worker's thread may deliver any due webhook: it claims it by pushing its score `claim_seconds` ahead, so
a webhook whose sender died mid-delivery is delivered by another after that (at least once; exactly once
when nothing crashes: a late result from a superseded claim is not recorded).

Each POST is signed (`producer.webhooks.sign`), goes only to the addresses the SSRF guard checked at
delivery time (pinned, so DNS rebinding cannot redirect it), follows no redirect, and is retried with
exponential backoff until `max_attempts`.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.typing import EncodableT, FieldT

from producer.errors import SpecError
from producer.keys import WEBHOOK_OUTBOX, webhook_key
from producer.webhooks import SIGNATURE_HEADER, IPAddress, check_webhook_url, sign

log = logging.getLogger(__name__)

STATE_TTL_SECONDS = 7 * 24 * 3600
"""How long a webhook's delivery state is kept after it was queued."""
BATCH = 16
"""Due webhooks read per pass."""
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
    """Queues webhooks in Redis and delivers due ones from a daemon thread (`start`), or one pass (`deliver_due`)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        secret: str | None,
        allowed_hosts: Sequence[str] = (),
        max_attempts: int = 5,
        backoff: float = 2.0,
        timeout: float = 10.0,
        claim_seconds: float = 60.0,
        poll_seconds: float = 2.0,
    ) -> None:
        self.client = client
        self.secret = secret or None
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.timeout = timeout
        self.claim_seconds = claim_seconds
        self.poll_seconds = poll_seconds
        self._claim_script = client.register_script(_CLAIM)
        self._record_script = client.register_script(_RECORD)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

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
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="render-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the delivery thread after the attempt in flight, waiting up to `timeout` seconds for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def deliver_due(self, now: float | None = None) -> int:
        """Claim and attempt up to 16 deliveries due at `now` (default: the clock); return how many were attempted."""
        at = time.time() if now is None else now
        attempted = 0
        for raw in self.client.zrangebyscore(WEBHOOK_OUTBOX, "-inf", at, start=0, num=BATCH):
            claim = self._claim(_text(raw), at)
            if claim is None:
                continue  # another sender took it first
            attempted += 1
            outcome = self._attempt(claim)
            self._record(claim, outcome, time.time() if now is None else now)  # backoff counts from the answer
        return attempted

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
        try:
            addresses = check_webhook_url(claim.url, self.allowed_hosts)
            return self._post(claim, addresses, self.secret)
        except SpecError as exc:
            return _Outcome(None, f"refused: {exc}", final=True)
        except TimeoutError:
            return _Outcome(None, f"timed out after {self.timeout:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return _Outcome(None, f"could not deliver: {type(exc).__name__}: {exc}".rstrip(": "))
        except Exception as exc:  # never leave a claim to lapse and repeat forever: count it as a failed attempt
            log.exception("webhook of task %s failed unexpectedly", claim.task_id)
            return _Outcome(None, f"unexpected error: {type(exc).__name__}: {exc}")

    def _post(self, claim: _Claim, addresses: list[IPAddress], secret: str) -> _Outcome:
        parts = urlsplit(claim.url)
        host = parts.hostname or ""
        connection: http.client.HTTPConnection
        if parts.scheme.lower() == "https":
            connection = PinnedHTTPSConnection(host, parts.port or 443, addresses=addresses, timeout=self.timeout)
        else:
            connection = PinnedHTTPConnection(host, parts.port or 80, addresses=addresses, timeout=self.timeout)
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
        while not self._stop.is_set():
            wait = self.poll_seconds
            try:
                if self.deliver_due() >= BATCH:
                    continue  # more may be due at once
                wait = self._until_next_due()
                if self._failing:
                    log.warning("webhook delivery reaches Redis again")
                self._failing = False
            except Exception as exc:  # the thread outlives any outage; deliveries wait in Redis meanwhile
                if not self._failing:
                    log.warning("webhook delivery failed (retrying every %.1f s): %s", self.poll_seconds, exc)
                self._failing = True
            self._wake.wait(wait)
            self._wake.clear()

    def _until_next_due(self) -> float:
        first = self.client.zrange(WEBHOOK_OUTBOX, 0, 0, withscores=True)
        if not first:
            return self.poll_seconds
        return max(0.0, min(self.poll_seconds, float(first[0][1]) - time.time()))


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to `host` (its Host header) whose TCP connection goes only to the checked `addresses`."""

    def __init__(self, host: str, port: int, *, addresses: Sequence[IPAddress], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = list(addresses)

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.port, self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked `addresses`, with SNI and certificate verification against `host` (the URL's name)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        addresses: Sequence[IPAddress],
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = context or ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.addresses = list(addresses)

    def connect(self) -> None:
        sock = _connect(self.addresses, self.port, self.timeout)
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _connect(addresses: Sequence[IPAddress], port: int, timeout: float | None) -> socket.socket:
    error: OSError = OSError("no address to connect to")
    for address in addresses:
        try:
            sock = socket.create_connection((str(address), port), timeout)
        except OSError as exc:
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
