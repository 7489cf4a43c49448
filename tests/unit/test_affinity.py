"""The order a worker polls its lists in: loaded model first within a priority, starved lists before all."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from localfarm.cluster import RedisServer
from producer.keys import PRIORITY_STEPS, SUBMITTED_AT_HEADER, priority_lists
from worker.celery_app import create_app
from worker.process.affinity import Affinity, AffinityWatcher
from worker.settings import WorkerSettings

QUEUES = ["render.a", "render.b", "render"]


def kombu_lists() -> list[tuple[int, str, str]]:
    """What kombu's channel hands over: every priority step, and within it every queue in its round robin."""
    names = {step: name for step, name in zip(PRIORITY_STEPS, ("high", "normal", "low"), strict=True)}
    return [(step, queue, priority_lists(queue)[names[step]]) for step in PRIORITY_STEPS for queue in QUEUES]


def test_without_a_loaded_model_the_order_is_kombus() -> None:
    assert Affinity(QUEUES[:2]).order(kombu_lists()) == [name for _, _, name in kombu_lists()]


def test_the_loaded_models_queue_goes_first_within_each_priority_never_above_a_higher_one() -> None:
    affinity = Affinity(QUEUES[:2])
    affinity.delivered("render.b")
    order = affinity.order(kombu_lists())
    lists = priority_lists
    assert order[:3] == [lists("render.b")["high"], lists("render.a")["high"], lists("render")["high"]]
    assert order[3:6] == [lists("render.b")["normal"], lists("render.a")["normal"], lists("render")["normal"]]
    assert order[6] == lists("render.b")["low"]


def test_a_job_from_the_bare_queue_does_not_change_the_preference() -> None:
    affinity = Affinity(QUEUES[:2])
    affinity.delivered("render.a")
    affinity.delivered("render")
    assert affinity.loaded_queue == "render.a"


def test_starved_lists_come_first_longest_wait_first() -> None:
    affinity = Affinity(QUEUES[:2])
    affinity.delivered("render.a")
    low_b, normal_a = priority_lists("render.b")["low"], priority_lists("render.a")["normal"]
    affinity.starved = (low_b, normal_a)
    assert affinity.order(kombu_lists())[:3] == [low_b, normal_a, priority_lists("render.a")["high"]]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(server.url) as connection:
        yield connection


def test_each_worker_app_s_channel_polls_in_its_own_affinity_s_order(server: RedisServer) -> None:
    """The app hands its `Affinity` to its broker channel; the transport options stay JSON (`inspect stats`)."""
    served = ({"tiny-sd15": {"family": "sd15", "source": "tiny"}}, {"tiny-sdxl": {"family": "sdxl", "source": "tiny"}})
    apps = [create_app(WorkerSettings(redis_url=server.url, models=models)) for models in served]
    affinities = []
    for app in apps:
        json.dumps(app.conf.broker_transport_options)
        with app.connection_for_read() as connection:
            affinities.append(connection.default_channel.affinity)
    assert [a.model_queues if a else None for a in affinities] == [{"render.tiny-sd15"}, {"render.tiny-sdxl"}]


def message(submitted_at: float | None, body_size: int = 10) -> str:
    headers = {"task": "render.run"} | ({SUBMITTED_AT_HEADER: submitted_at} if submitted_at is not None else {})
    return json.dumps({"body": "A" * body_size, "content-type": "application/json", "headers": headers})


def test_the_watcher_marks_lists_whose_oldest_job_waited_too_long(client: redis.Redis) -> None:
    client.flushdb()
    lists = [name for queue in QUEUES for name in priority_lists(queue).values()]
    normal_a, low_b, high_a = priority_lists("render.a")["normal"], priority_lists("render.b")["low"], lists[0]
    client.lpush(normal_a, message(1000.0), message(1090.0))  # oldest at the tail: waited 100 s
    client.lpush(low_b, message(950.0, body_size=2_000_000))  # 150 s, behind a 2 MB body read on the server
    client.lpush(high_a, message(1095.0))  # 5 s: not starved
    client.lpush(priority_lists("render")["normal"], message(None))  # no header: never counted as starved
    affinity = Affinity(QUEUES[:2])
    watcher = AffinityWatcher(client, affinity, lists, switch_after=60)
    assert watcher.check(now=1100.0) == (low_b, normal_a)
    assert affinity.starved == (low_b, normal_a)
    assert watcher.check(now=1020.0) == (low_b,)
    client.delete(low_b, normal_a)
    assert watcher.check(now=5000.0) == (high_a,)


def test_the_check_interval_follows_the_switch_bound(client: redis.Redis) -> None:
    assert AffinityWatcher(client, Affinity([]), [], switch_after=60).interval == 5.0
    assert AffinityWatcher(client, Affinity([]), [], switch_after=2).interval == 0.5
