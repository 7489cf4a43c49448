"""Leases, the revocation hook and the recovery scan against a real redis-server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer.keys import RUNNING_TASKS, lease_key, revoked_key
from tests.helpers import free_port, wait_until
from worker.callbacks import StepInfo
from worker.jobcontrol import Lease, ProgressReport, RevocationCheck, control_client
from worker.local_cluster import RedisServer
from worker.stops import JobRevoked, LeaseLost

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/15")
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


def test_revocation_is_seen_at_the_next_step_and_counts_the_steps_after(client: redis.Redis) -> None:
    reports: list[tuple[int, int]] = []
    hooks: list[Any] = [RevocationCheck(client, "job"), ProgressReport(lambda s, t: reports.append((s, t)), interval=0)]
    for hook in hooks:
        hook.on_step(step(1))
    for hook in hooks:
        hook.on_step(step(2))
    client.set(revoked_key("job"), json.dumps({"at": time.time()}))
    with pytest.raises(JobRevoked) as caught:
        for hook in hooks:  # as the stack runs them: the revoked job reports nothing more
            hook.on_step(step(3))
    assert caught.value.steps_completed == 3 and caught.value.steps_after_revoke == 1
    assert caught.value.revoked_at is not None
    assert reports == [(1, 10), (2, 10)]


def test_progress_is_throttled_but_the_last_step_always_reported(client: redis.Redis) -> None:
    reports: list[int] = []
    control = ProgressReport(lambda s, t: reports.append(s), interval=60)
    for n in range(1, 11):
        control.on_step(step(n))
    assert reports == [1, 10]


def test_redis_down_fails_open_and_does_not_slow_the_steps(caplog: pytest.LogCaptureFixture) -> None:
    dead = control_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    reads: list[str] = []
    real_get = dead.get

    def counting_get(name: str) -> Any:
        reads.append(name)
        return real_get(name)

    dead.get = counting_get  # type: ignore[method-assign,assignment]
    control = RevocationCheck(dead, "job", backoff=60)
    for n in range(1, 50):
        control.on_step(step(n, 50))  # keeps rendering
    assert reads == [revoked_key("job")], "one failed check, then none until the backoff ends"
    assert sum("revocation check failed" in r.message for r in caplog.records) == 1


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
