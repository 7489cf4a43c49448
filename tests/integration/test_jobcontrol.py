"""Leases, the revocation hook and the recovery scan against a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from localfarm.cluster import RedisServer
from producer.client import RenderClient
from producer.keys import RUNNING_TASKS, job_key, lease_key, revocations_channel, revoked_key
from producer.settings import ClientSettings
from tests.helpers import free_port, wait_until
from worker.engine.callbacks import StepInfo
from worker.engine.stops import JobRevoked, LeaseLost
from worker.process.jobcontrol import Lease, ProgressReport, RevocationWatch, control_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own: a test that counts its commands counts only its own (the session's
    server also serves other tests' idle workers, which poll it several times a second)."""
    with RedisServer(workdir=tmp_path_factory.mktemp("jobcontrol-redis")) as server:
        yield server


@pytest.fixture
def client(own_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(f"redis://127.0.0.1:{own_server.port}/15")
    connection.flushdb()
    yield connection
    connection.close()


def step(n: int, total: int = 10) -> StepInfo:
    return StepInfo("job", n, total, 0.1 * n)


def test_a_lease_is_exclusive_renewed_and_released_only_by_its_holder(client: redis.Redis) -> None:
    first = Lease(client, "job", ttl=2, owner="w1")
    second = Lease(client, "job", ttl=2, owner="w2")
    acquired = time.monotonic()
    assert first.acquire({"spec": "{}", "worker": "w1"})
    assert not second.acquire({"spec": "{}", "worker": "w2"})
    assert json.loads(client.hget(RUNNING_TASKS, "job"))["worker"] == "w1"  # type: ignore[arg-type]
    # Past the first TTL, only renewal keeps it: wait for a renewal made after the key would have expired.
    wait_until(lambda: first._renewed_at > acquired + 2.0, timeout=30, what="a renewal past the first ttl")
    assert not first.lost.is_set()
    assert first.holder() == first.token and not second.acquire({"spec": "{}"})
    second.release()  # not the holder: changes nothing
    assert first.holder() == first.token
    first.release()
    assert not client.exists(lease_key("job")) and not client.hexists(RUNNING_TASKS, "job")


def test_an_unrenewed_lease_expires(client: redis.Redis) -> None:
    client.set(lease_key("dead"), "w1:gone", px=300)
    wait_until(lambda: not client.exists(lease_key("dead")), timeout=30, what="the lease's expiry")
    assert Lease(client, "dead", ttl=5, owner="w2").acquire({"spec": "{}"})


def test_progress_is_throttled_but_the_last_step_always_reported(client: redis.Redis) -> None:
    reports: list[int] = []
    control = ProgressReport(lambda s, t: reports.append(s), interval=60)
    for n in range(1, 11):
        control.on_step(step(n))
    assert reports == [10]


def test_progress_reports_come_an_interval_apart_counted_from_the_first_step() -> None:
    reports: list[int] = []
    now = [100.0]
    control = ProgressReport(lambda s, t: reports.append(s), interval=1.0, clock=lambda: now[0])
    for n in range(1, 11):  # 0.3 s a step, from t = 100
        now[0] = 100 + 0.3 * n
        control.on_step(StepInfo("job", n, 10, 0.3 * n))
    assert reports == [4, 8, 10]  # at 1.2 s, 2.4 s, and the last step


@pytest.fixture
def watch(client: redis.Redis) -> Iterator[RevocationWatch]:
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/15"
    watch = RevocationWatch(control_client(url), "w1:1", poll=60).start()  # no poll inside a test: push only
    assert watch.subscribed.wait(30), "the watch never subscribed"
    yield watch
    watch.close()


def revoke(client: redis.Redis, task_id: str) -> None:
    """What `RenderClient.revoke` writes: the key, then the push to the worker the job's record names."""
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/15"
    producer = RenderClient(ClientSettings(redis_url=url))
    try:
        producer._mark_revoked_keys([task_id])
    finally:
        producer.close()


def test_a_revoke_is_pushed_to_the_worker_holding_the_job_and_stops_it_at_the_next_step(
    client: redis.Redis, watch: RevocationWatch
) -> None:
    client.hset(job_key("job"), "queue", "render")  # as its submit wrote it
    lease = Lease(client, "job", ttl=30, owner="w1:1")  # the job's record then names this worker's channel
    check = watch.watch("job")
    assert lease.acquire({"spec": "{}", "worker": "w1:1"})
    assert client.hget(job_key("job"), "worker") == b"w1:1"
    reports: list[tuple[int, int]] = []
    hooks: list[Any] = [check, ProgressReport(lambda s, t: reports.append((s, t)), interval=0)]
    commands_before = client.info("stats")["total_commands_processed"]
    for n in (1, 2):
        for hook in hooks:
            hook.on_step(step(n))
    assert client.info("stats")["total_commands_processed"] == commands_before + 1, "a step never asks Redis"
    revoke(client, "job")
    wait_until(check.is_revoked, timeout=30, what="the pushed revocation")
    with pytest.raises(JobRevoked) as caught:
        for hook in hooks:  # as the stack runs them: the revoked job reports nothing more
            hook.on_step(step(3))
    assert caught.value.steps_completed == 3 and caught.value.steps_after_revoke == 1
    assert caught.value.revoked_at is not None
    assert reports == [(1, 10), (2, 10)]
    lease.release()


def test_a_revoke_of_a_job_not_yet_leased_is_found_by_the_read_after_the_lease(
    client: redis.Redis, watch: RevocationWatch
) -> None:
    revoke(client, "queued")  # no record in render:running yet: nobody is told, the key is written
    check = watch.watch("queued")
    assert not check.is_revoked()
    assert check.read(client) and check.revoked_at is not None
    other = watch.watch("other")
    assert not other.read(client)


def test_a_revoke_whose_push_was_missed_is_read_from_its_key(client: redis.Redis) -> None:
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/15"
    watch = RevocationWatch(control_client(url), "w2:1", poll=0.2).start()
    try:
        check = watch.watch("missed")
        client.set(revoked_key("missed"), json.dumps({"at": time.time()}))  # written, never published
        wait_until(check.is_revoked, timeout=30, what="the revocation read by the poll")
        watch.forget(check)
        later = watch.watch("missed")  # a new delivery of the job watches afresh
        wait_until(later.is_revoked, timeout=30, what="the revocation read again")
    finally:
        watch.close()


def test_redis_down_fails_open_then_the_watch_reconnects_and_hears_revokes(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    watch = RevocationWatch(control_client(url, timeout=0.5), "w3:1", poll=60, backoff=0.1).start()
    try:
        check = watch.watch("job")
        for n in range(1, 50):
            check.on_step(step(n, 50))  # keeps rendering: the steps read a flag
        wait_until(
            lambda: any("revocation channel" in r.message for r in caplog.records), timeout=30, what="the warning"
        )
        with RedisServer(port=port, workdir=tmp_path) as server:
            assert watch.subscribed.wait(30), "the watch never reconnected"
            back = redis.Redis.from_url(server.url)
            back.set(revoked_key("job"), json.dumps({"at": time.time()}))
            back.publish(revocations_channel("w3:1"), json.dumps({"task_id": "job", "at": time.time()}))
            wait_until(check.is_revoked, timeout=30, what="the revocation after the reconnect")
            back.close()
        assert sum("revocation channel" in r.message for r in caplog.records) == 1, "one warning per outage"
    finally:
        watch.close()


def test_a_lease_taken_over_is_lost_and_the_step_hook_stops_the_render(client: redis.Redis) -> None:
    lease = Lease(client, "job", ttl=0.6, owner="w1")
    assert lease.acquire({"spec": "{}", "worker": "w1"})
    hook = lease  # the lease is itself a step hook: it reads the flag its renewal thread keeps
    hook.on_step(step(1))  # held: the render goes on
    client.set(lease_key("job"), "w2:someone-else")  # another worker owns the job now
    assert lease.lost.wait(timeout=30), "renewal never noticed the other holder"
    with pytest.raises(LeaseLost, match="lease render:lease:job lost"):
        hook.on_step(step(2))
    lease.release()
    assert client.get(lease_key("job")) == b"w2:someone-else", "releasing never deletes another worker's lease"


def test_a_lease_unrenewable_for_a_whole_ttl_is_lost(client: redis.Redis) -> None:
    dead = control_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    lease = Lease(client, "job", ttl=0.6, owner="w1", renew_client=dead)
    assert lease.acquire({"spec": "{}", "worker": "w1"})
    assert not lease.lost.wait(0.3), "one failed renewal is not a loss"
    assert lease.lost.wait(3), "no renewal for a whole ttl is"
    lease.release()
