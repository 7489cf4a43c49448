"""Webhooks against a real private redis-server and a real HTTP(S) receiver on 127.0.0.1: signing, retries and
backoff, the SSRF guard (before and at delivery), claims left by a dead sender, and Redis outages."""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from localfarm.cluster import RedisServer
from producer.errors import ConfigError, SpecError
from producer.keys import WEBHOOK_OUTBOX, webhook_key
from producer.webhooks import SIGNATURE_HEADER, check_webhook_url, delivery_state, parse_allowed_hosts, sign, verify
from tests.helpers import free_port, wait_until
from worker.process.jobcontrol import control_client
from worker.process.pinned_http import PinnedHTTPSConnection
from worker.process.webhooks import NO_SECRET, WebhookSender, _Outcome

SECRET = "s3cret-for-tests"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers `statuses` in turn, then 204."""

    statuses: list[int] = field(default_factory=list)
    stall: threading.Event | None = None  # when set up, each request waits for it before answering
    trickle: threading.Event | None = None  # when set up, the answer goes out a byte a second until it is set
    trickled: int = 0  # bytes of the trickled answer sent so far
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


TRICKLED = b"HTTP/1.1 204 No Content\r\nX-Padding: " + b"." * 100 + b"\r\nContent-Length: 0\r\n\r\n"
"""A valid answer of 140 bytes: sent a byte a second, it takes over two minutes, each read well inside the timeout."""


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        receiver: Receiver = self.server.receiver  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        receiver.requests.append(Received(self.path, dict(self.headers.items()), body, time.monotonic()))
        if receiver.trickle is not None:
            self.close_connection = True
            try:
                for byte in TRICKLED:
                    self.wfile.write(bytes([byte]))
                    receiver.trickled += 1
                    if receiver.trickle.wait(1):
                        return
            except OSError:
                pass  # the sender hung up
            return
        if receiver.stall is not None:
            receiver.stall.wait(10)
        status = receiver.statuses.pop(0) if receiver.statuses else 204
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def serve(receiver: Receiver, wrap: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if wrap is not None:
        server.socket = wrap.wrap_socket(server.socket, server_side=True)
    server.receiver = receiver  # type: ignore[attr-defined]
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        for gate in (receiver.stall, receiver.trickle):
            if gate is not None:
                gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve(Receiver())


def make_sender(client: redis.Redis, **options: Any) -> WebhookSender:
    defaults: dict[str, Any] = {"secret": SECRET, "allowed_hosts": ("127.0.0.1",), "backoff": 0.05, "timeout": 5}
    return WebhookSender(client, **{**defaults, **options})


def body_of(task_id: str) -> bytes:
    return json.dumps({"task_id": task_id, "status": "succeeded", "images": [f"s3://b/{task_id}/image-0.png"]}).encode()


def state(client: redis.Redis, task_id: str) -> dict[str, Any]:
    found = delivery_state(client, task_id)
    assert found is not None, f"no webhook queued for {task_id}"
    return found


def test_each_job_gets_one_signed_post_that_verify_accepts(client: redis.Redis, receiver: Receiver) -> None:
    sender = make_sender(client)
    sender.start()
    try:
        for task_id in ("job-a", "job-b"):
            sender.enqueue(task_id, receiver.url(f"/hook?job={task_id}"), body_of(task_id))
        wait_until(
            lambda: all(state(client, t)["state"] == "delivered" for t in ("job-a", "job-b")),
            timeout=10,
            what="both webhooks to be delivered",
        )
    finally:
        sender.stop(timeout=5)
    assert sender.deliver_due(now=time.time() + 3600) == 0  # nothing left to send, ever
    assert sorted(r.path for r in receiver.requests) == ["/hook?job=job-a", "/hook?job=job-b"]
    for request in receiver.requests:
        task_id = request.headers["X-Render-Task-Id"]
        assert request.body == body_of(task_id)
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["User-Agent"] == "render-farm-webhook"
        assert request.headers["X-Render-Delivery-Attempt"] == "1"
        assert request.headers["Host"] == f"127.0.0.1:{receiver.port}"
        signature = request.headers[SIGNATURE_HEADER]
        assert signature == sign(SECRET, request.body) and signature.startswith("sha256=")
        assert verify(SECRET, request.body, signature)
        assert not verify("another-secret", request.body, signature)
        assert not verify(SECRET, request.body + b" ", signature)
        assert not verify(SECRET, request.body, None)
        found = state(client, task_id)
        assert (found["state"], found["attempts"], found["last_status"], found["last_error"]) == (
            "delivered",
            1,
            204,
            None,
        )
        assert found["url"] == receiver.url(f"/hook?job={task_id}") and found["next_attempt_at"] is None
        assert time.time() - 30 < found["delivered_at"] <= time.time()
    assert client.zcard(WEBHOOK_OUTBOX) == 0
    assert 6 * 24 * 3600 < client.ttl(webhook_key("job-a")) <= 7 * 24 * 3600
    assert delivery_state(client, "never-queued") is None


def test_a_receiver_failing_twice_gets_the_post_on_the_third_try_after_backoff(client: redis.Redis) -> None:
    for receiver in serve(Receiver(statuses=[500, 500])):
        sender = make_sender(client, backoff=0.05)
        sender.start()
        try:
            sender.enqueue("job-r", receiver.url(), body_of("job-r"))
            wait_until(lambda: state(client, "job-r")["state"] == "delivered", timeout=10, what="the third try")
        finally:
            sender.stop(timeout=5)
        found = state(client, "job-r")
        assert (found["attempts"], found["last_status"], found["last_error"]) == (3, 204, None)
        assert [r.headers["X-Render-Delivery-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
        assert {r.body for r in receiver.requests} == {body_of("job-r")}
        first, second, third = (r.at for r in receiver.requests)
        assert second - first >= 0.04 and third - second >= 0.09  # backoff * 2**(attempt - 1): 0.05 s, then 0.1 s


def test_attempts_are_scheduled_with_backoff_and_fail_after_max_attempts(client: redis.Redis) -> None:
    for receiver in serve(Receiver(statuses=[500] * 10)):
        sender = make_sender(client, max_attempts=3, backoff=10)
        sender.enqueue("job-f", receiver.url(), body_of("job-f"))
        t = time.time() + 1
        assert state(client, "job-f")["state"] == "pending"
        assert sender.deliver_due(now=t) == 1
        found = state(client, "job-f")
        assert (found["state"], found["attempts"], found["last_status"]) == ("retrying", 1, 500)
        assert "500" in found["last_error"] and found["next_attempt_at"] == pytest.approx(t + 10)
        assert client.zscore(WEBHOOK_OUTBOX, "job-f") == pytest.approx(t + 10)
        assert sender.deliver_due(now=t + 9) == 0  # not due yet
        assert sender.deliver_due(now=t + 10) == 1
        assert state(client, "job-f")["next_attempt_at"] == pytest.approx(t + 30)  # 10 * 2**1
        assert sender.deliver_due(now=t + 30) == 1
        found = state(client, "job-f")
        assert (found["state"], found["attempts"], found["last_status"], found["next_attempt_at"]) == (
            "failed",
            3,
            500,
            None,
        )
        assert client.zscore(WEBHOOK_OUTBOX, "job-f") is None
        assert sender.deliver_due(now=t + 10_000) == 0
        assert len(receiver.requests) == 3


def test_a_redirect_is_not_followed_and_a_stalled_receiver_times_out(client: redis.Redis) -> None:
    for receiver in serve(Receiver(statuses=[302])):
        sender = make_sender(client, max_attempts=1)
        sender.enqueue("job-302", receiver.url(), body_of("job-302"))
        assert sender.deliver_due() == 1
        found = state(client, "job-302")
        assert (found["state"], found["last_status"]) == ("failed", 302)
        assert "not followed" in found["last_error"]
        assert [r.path for r in receiver.requests] == ["/hook"]
    for receiver in serve(Receiver(stall=threading.Event())):
        sender = make_sender(client, timeout=0.2)
        sender.enqueue("job-slow", receiver.url(), body_of("job-slow"))
        assert sender.deliver_due() == 1
        found = state(client, "job-slow")
        assert (found["state"], found["attempts"], found["last_status"]) == ("retrying", 1, None)
        assert found["last_error"] == "timed out after 0.2 s"


@pytest.fixture
def trickling() -> Iterator[Receiver]:
    yield from serve(Receiver(trickle=threading.Event()))


def test_a_trickling_receiver_is_cut_at_the_timeout_while_other_jobs_webhooks_go_out(
    client: redis.Redis, trickling: Receiver, receiver: Receiver
) -> None:
    sender = make_sender(client, timeout=5, backoff=60)
    sender.start()
    try:
        sender.enqueue("job-slow", trickling.url(), body_of("job-slow"))
        wait_until(lambda: trickling.trickled >= 1, timeout=10, what="the trickled answer to begin")
        sender.enqueue("job-fast", receiver.url(), body_of("job-fast"))
        wait_until(
            lambda: state(client, "job-fast")["state"] == "delivered",
            timeout=30,
            what="the other job's webhook, while the trickling one is in flight",
        )
        assert state(client, "job-slow")["state"] == "pending"  # its attempt is still in flight
        wait_until(
            lambda: state(client, "job-slow")["state"] != "pending",
            timeout=30,  # the whole answer would take 140 s; its reads alone would never time out
            what="the trickling receiver's attempt to be cut",
        )
        sent = trickling.trickled
    finally:
        sender.stop(timeout=10)
    found = state(client, "job-slow")
    assert (found["state"], found["attempts"], found["last_status"], found["last_error"]) == (
        "retrying",
        1,
        None,
        "timed out after 5 s",
    )
    assert sent < len(TRICKLED)  # cut mid-answer, not after it
    assert len(trickling.requests) == len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (socket.EAI_AGAIN, "Temporary failure in name resolution"),
        # The producer refused names that did not resolve at submit: one that stops resolving by delivery is a
        # resolver's glitch, a propagation delay or a negative cache more often than a name that went away.
        (socket.EAI_NONAME, "Name or service not known"),
    ],
)
def test_a_dns_failure_at_delivery_is_retried_and_the_webhook_then_delivered(
    client: redis.Redis, receiver: Receiver, code: int, reason: str
) -> None:
    looked_up: list[tuple[str, int]] = []

    def failing_twice(host: str, port: int, family: int = 0, kind: int = 0) -> list[tuple[Any, ...]]:
        looked_up.append((host, port))
        if len(looked_up) <= 2:
            raise socket.gaierror(code, reason)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    sender = make_sender(client, allowed_hosts=("hooks.test",), backoff=10, resolve=failing_twice)
    sender.enqueue("job-dns", receiver.url(host="hooks.test"), body_of("job-dns"))
    t = time.time() + 1
    for attempt, now in ((1, t), (2, t + 10)):
        assert sender.deliver_due(now=now) == 1
        found = state(client, "job-dns")
        assert (found["state"], found["attempts"], found["last_status"]) == ("retrying", attempt, None)
        assert found["last_error"] == f"could not resolve hooks.test ({reason})"
    assert receiver.requests == []
    assert sender.deliver_due(now=t + 30) == 1
    found = state(client, "job-dns")
    assert (found["state"], found["attempts"], found["last_status"], found["last_error"]) == ("delivered", 3, 204, None)
    assert looked_up == [("hooks.test", receiver.port)] * 3
    assert [r.headers["Host"] for r in receiver.requests] == [f"hooks.test:{receiver.port}"]


REFUSED = [
    ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
    ("http://127.0.0.1:{port}/x", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[fe80::1]/", "link-local"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://100.64.0.1/", "not a public address"),
    ("ftp://example.com/", "http:// or https://"),
    ("http://user:pw@example.com/", "user name or password"),
    ("http:///path-only", "no host"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://no-such-host.invalid/", "does not resolve"),
    ("http://example.com/" + "a" * 2048, "at most 2048"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_the_ssrf_guard_refuses_internal_and_malformed_urls(url: str, reason: str) -> None:
    with pytest.raises(SpecError, match=r"^webhook: ") as refused:
        check_webhook_url(url.format(port=free_port()), ["hooks.internal", "192.168.0.0/16"])
    assert reason in str(refused.value)
    if reason in ("loopback", "private", "link-local", "cloud metadata"):
        assert "add the host" in str(refused.value) and "RENDER_WEBHOOK_HOSTS" in str(refused.value)
    with pytest.raises(SpecError, match=r"^spec\.webhook: "):
        check_webhook_url(url.format(port=1), [], field="spec.webhook")


def test_listed_hosts_addresses_and_networks_are_allowed() -> None:
    loopback = [ipaddress.ip_address("127.0.0.1")]
    assert check_webhook_url("http://127.0.0.1:8080/x", ["127.0.0.1"]) == loopback
    assert check_webhook_url("http://127.0.0.1:8080/x", parse_allowed_hosts("hooks.internal, 127.0.0.0/8")) == loopback
    assert check_webhook_url("http://[::ffff:127.0.0.1]/", ["127.0.0.0/8"]) == loopback  # judged as IPv4
    assert check_webhook_url("https://LOCALHOST./", ["localhost"]) == loopback  # by name, case-insensitive
    assert check_webhook_url("http://10.1.2.3/", ["10.0.0.0/8"]) == [ipaddress.ip_address("10.1.2.3")]
    assert check_webhook_url("https://93.184.215.14/hook", []) == [ipaddress.ip_address("93.184.215.14")]
    with pytest.raises(SpecError, match="10.1.2.3 is a private address"):
        check_webhook_url("http://10.1.2.3/", ["127.0.0.0/8", "hooks.internal"])


def test_allowed_hosts_are_parsed_and_malformed_entries_named() -> None:
    assert parse_allowed_hosts(" Hooks.Internal., 10.0.0.0/8  127.0.0.1,,[::1] ") == (
        "hooks.internal",
        "10.0.0.0/8",
        "127.0.0.1",
        "::1",
    )
    assert parse_allowed_hosts(["a.example", " b.example ", "::ffff:10.0.0.1"]) == (
        "a.example",
        "b.example",
        "10.0.0.1",
    )
    with pytest.raises(ConfigError, match="'a.example, b.example' is not"):  # a list's entry is one host
        parse_allowed_hosts(["a.example, b.example"])
    assert parse_allowed_hosts("") == ()
    for bad in ("10.0.0.0/33", "10.0.0.1/8", "http://hooks", "a..b", "300.1.1.1", "-x.example"):
        with pytest.raises(ConfigError, match="RENDER_WEBHOOK_HOSTS") as refused:
            parse_allowed_hosts(f"ok.example, {bad}")
        assert repr(bad) in str(refused.value)


def test_a_url_refused_at_delivery_fails_at_once_and_sends_nothing(client: redis.Redis, receiver: Receiver) -> None:
    sender = make_sender(client, allowed_hosts=())  # the receiver is on loopback, which is not listed here
    sender.enqueue("job-ssrf", receiver.url(), body_of("job-ssrf"))
    assert sender.deliver_due() == 1
    found = state(client, "job-ssrf")
    assert (found["state"], found["attempts"], found["last_status"]) == ("failed", 1, None)
    assert found["last_error"].startswith("refused: webhook: 127.0.0.1 is a loopback address")
    assert receiver.requests == [] and client.zcard(WEBHOOK_OUTBOX) == 0


def test_the_connection_is_pinned_while_the_host_header_keeps_the_urls_name(
    client: redis.Redis, receiver: Receiver
) -> None:
    sender = make_sender(client, allowed_hosts=("localhost",))
    sender.enqueue("job-name", receiver.url(host="localhost"), body_of("job-name"))
    assert sender.deliver_due() == 1
    assert state(client, "job-name")["state"] == "delivered"
    assert [r.headers["Host"] for r in receiver.requests] == [f"localhost:{receiver.port}"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_goes_to_the_pinned_address_and_verifies_the_urls_name(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=hooks.test"]
        + ["-addext", "subjectAltName=DNS:hooks.test"],
        check=True,
        capture_output=True,
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    loopback = [ipaddress.ip_address("127.0.0.1")]
    for receiver in serve(Receiver(), wrap=server_side):
        # hooks.test resolves nowhere: the request can only have gone to the pinned address.
        good = PinnedHTTPSConnection("hooks.test", receiver.port, addresses=loopback, timeout=5, context=trusting)
        good.request("POST", "/tls", body=b"{}", headers={"Content-Type": "application/json"})
        assert good.getresponse().status == 204
        good.close()
        assert [(r.path, r.headers["Host"]) for r in receiver.requests] == [("/tls", f"hooks.test:{receiver.port}")]
        wrong = PinnedHTTPSConnection("other.test", receiver.port, addresses=loopback, timeout=5, context=trusting)
        with pytest.raises(ssl.SSLCertVerificationError, match="other.test"):
            wrong.request("POST", "/tls", body=b"{}")
        wrong.close()
        assert len(receiver.requests) == 1


def test_a_claim_left_by_a_dead_sender_is_delivered_by_another_after_claim_seconds(
    client: redis.Redis, receiver: Receiver
) -> None:
    dead = make_sender(client, claim_seconds=30)
    live = make_sender(client, claim_seconds=30)
    dead.enqueue("job-d", receiver.url(), body_of("job-d"))
    t = time.time() + 1
    claim = dead._claim("job-d", t)  # the dead sender claimed it, then its process died before the POST
    assert claim is not None and dead._claim("job-d", t) is None  # a claim is taken once
    assert live.deliver_due(now=t + 29) == 0 and receiver.requests == []
    assert live.deliver_due(now=t + 30) == 1
    found = state(client, "job-d")
    assert (found["state"], found["attempts"], found["last_status"]) == ("delivered", 1, 204)
    assert len(receiver.requests) == 1
    assert not dead._record(claim, _Outcome(500, "late"), t + 31)  # a superseded claim records nothing
    assert state(client, "job-d") == found


@pytest.mark.parametrize("secret", [None, ""])
def test_without_a_secret_nothing_is_sent_and_the_delivery_fails(
    client: redis.Redis, receiver: Receiver, secret: str | None
) -> None:
    sender = make_sender(client, secret=secret)
    sender.enqueue("job-n", receiver.url(), body_of("job-n"))
    assert sender.deliver_due() == 1
    found = state(client, "job-n")
    assert (found["state"], found["attempts"], found["last_error"]) == ("failed", 1, NO_SECRET)
    assert receiver.requests == [] and client.zcard(WEBHOOK_OUTBOX) == 0


def test_enqueue_with_redis_down_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    down = control_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    sender = make_sender(down)
    with caplog.at_level(logging.WARNING, logger="worker.process.webhooks"):
        started = time.monotonic()
        sender.enqueue("job-down", "http://127.0.0.1:1/hook", b"{}")
        assert time.monotonic() - started < 5
    assert any("job-down" in record.getMessage() for record in caplog.records)


def test_the_thread_rides_out_a_redis_outage(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    own = control_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    sender = make_sender(own, poll_seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="worker.process.webhooks"):
        with RedisServer(port=port, workdir=tmp_path / "first"):
            sender.start()
        try:
            wait_until(
                lambda: any("retrying" in r.getMessage() for r in caplog.records),
                timeout=10,
                what="the delivery thread to notice Redis is down",
            )
            with RedisServer(port=port, workdir=tmp_path / "second"):
                sender.enqueue("job-back", receiver.url(), body_of("job-back"))
                wait_until(lambda: len(receiver.requests) == 1, timeout=10, what="delivery after Redis came back")
                wait_until(lambda: state(own, "job-back")["state"] == "delivered", timeout=10, what="the record")
        finally:
            sender.stop(timeout=5)
    own.close()


def test_stop_ends_the_thread(client: redis.Redis) -> None:
    sender = make_sender(client, poll_seconds=30)
    sender.start()
    sender.start()  # a no-op while it runs
    thread = sender._thread
    assert thread is not None and thread.is_alive()
    sender.stop(timeout=5)
    assert not thread.is_alive()
