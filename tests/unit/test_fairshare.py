"""Fair share at dequeue: the worker's own broker channel pops from the tenants' lists in weighted turn, FIFO inside a
tenant, priorities first, and passes over a tenant at its `max_gpus`. A real redis-server; no mocks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.transport.virtual import Empty

from localfarm.cluster import RedisServer
from producer.keys import DEFAULT_TENANT, PRIORITIES, gpus_key, scoped_id, tenant_of, tenant_queue
from producer.records import TaskMessage
from worker.celery_app import create_app
from worker.process import fairshare
from worker.process.fairshare import free_gpu, sweep_gpus
from worker.process.transport import Channel
from worker.settings import WorkerSettings

QUEUE = "render.tiny-sd15"
TENANTS = {"team-a": {"weight": 2}, "team-b": {}, "team-c": {"max_gpus": 1}}


@pytest.fixture
def app(server: RedisServer, client: redis.Redis) -> Iterator[Any]:
    yield create_app(
        WorkerSettings(
            redis_url=server.url, models={"tiny-sd15": {"family": "sd15", "source": "tiny"}}, tenants=TENANTS
        )
    )


@pytest.fixture
def channel(app: Any) -> Iterator[Channel]:
    with app.connection_for_read() as connection:
        chan = connection.default_channel
        assert isinstance(chan, Channel)
        chan.client.script_load(fairshare.POP)
        chan.delivered = []  # type: ignore[attr-defined]
        chan.basic_consume(QUEUE, False, chan.delivered.append, "test-consumer")  # type: ignore[attr-defined]
        yield chan


def send(app: Any, tenant: str, name: str, priority: str = "normal") -> str:
    task_id = scoped_id(tenant, name)
    spec = json.dumps({"model": "tiny-sd15", "prompt": name})
    TaskMessage(task_id, spec, tenant_queue(QUEUE, tenant), PRIORITIES[priority], 1.0).send(app)
    return task_id


def take(channel: Channel, count: int) -> list[str]:
    """The ids of the next `count` jobs the channel delivers, polling as the worker's event loop does."""
    taken: list[str] = []
    while len(taken) < count:
        channel.connection.cycle._register_BRPOP(channel)
        try:
            channel._brpop_read()
        except Empty:
            if channel._waiting:  # nothing to pop: the channel would wait now
                break
            continue
        message = channel.delivered.pop()  # type: ignore[attr-defined]
        taken.append(message.headers["id"])
        message.ack()
    return taken


def test_tenants_take_turns_by_weight_and_each_keeps_its_submit_order(app: Any, channel: Channel) -> None:
    a = [send(app, "team-a", f"a{i}") for i in range(8)]
    b = [send(app, "team-b", f"b{i}") for i in range(8)]
    first = take(channel, 9)
    assert [tenant_of(t) for t in first].count("team-a") == 6, first  # weight 2 against 1: two jobs to one
    assert [t for t in first if t in a] == a[:6] and [t for t in first if t in b] == b[:3]  # FIFO in each


def test_a_small_tenant_behind_a_large_backlog_starts_within_a_few_jobs(app: Any, channel: Channel) -> None:
    for i in range(60):
        send(app, "team-b", f"big{i}")
    assert take(channel, 3) == [scoped_id("team-b", f"big{i}") for i in range(3)]  # alone, it has the fleet
    small = [send(app, DEFAULT_TENANT, f"small{i}") for i in range(5)]
    taken = take(channel, 10)
    assert all(job in taken for job in small), taken  # all five within the next ten, not after the 57 left
    assert [job for job in taken if job in small] == small


def test_a_higher_priority_wins_across_tenants(app: Any, channel: Channel) -> None:
    for i in range(3):
        send(app, "team-a", f"n{i}")
    urgent = send(app, "team-b", "urgent", "high")
    assert take(channel, 1) == [urgent]


def test_a_tenant_at_its_max_gpus_waits_while_others_are_taken(app: Any, channel: Channel, client: redis.Redis) -> None:
    c = [send(app, "team-c", f"c{i}") for i in range(3)]
    b = send(app, "team-b", "b0")
    taken = take(channel, 3)
    assert sorted(taken) == sorted([c[0], b]), taken  # team-c holds its one GPU: nothing more of it is taken
    assert client.zrange(gpus_key("team-c"), 0, -1) == [c[0].encode()]
    assert client.zcard(gpus_key("team-b")) == 0  # an uncapped tenant's jobs take no slot
    free_gpu(client, c[0])  # its job ended
    assert take(channel, 1) == [c[1]]


def test_a_slot_no_worker_runs_is_swept_after_its_grace(app: Any, channel: Channel, client: redis.Redis) -> None:
    send(app, "team-c", "c0")
    assert take(channel, 1) == ["team-c@c0"]
    assert sweep_gpus(client, ["team-c"], grace=3600, now=time.time()) == 0  # within its grace: kept
    assert sweep_gpus(client, ["team-c"], grace=30, now=time.time() + 60) == 1  # its worker died before the lease
    assert client.zcard(gpus_key("team-c")) == 0
