"""The fleet's adverts against a real (private) redis-server: heartbeats, expiry, reads, and `render workers`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch
from prometheus_client import REGISTRY

from localfarm.cluster import RedisServer
from producer import ConfigError
from producer.fleet import live_workers, queue_lengths, served_by, served_models
from producer.keys import WORKERS, model_queue, model_workers_key, priority_lists, worker_key
from tests.helpers import free_port, render_cli, wait_until
from worker.models.registry import ModelRegistry
from worker.process.fleet import Heartbeat, JobAdvert
from worker.process.jobcontrol import control_client
from worker.settings import default_models, load_settings

ROOT = Path(__file__).parents[2]
MODELS = ["tiny-sd15", "tiny-sdxl"]


def fresh_registry() -> ModelRegistry:
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=2)


def heartbeat(client: redis.Redis, hostname: str = "gpu0@host", *, interval: float = 5, ttl: float = 15) -> Heartbeat:
    queues = [model_queue("render", model) for model in MODELS]
    families = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
    return Heartbeat(
        client, hostname=hostname, models=MODELS, queues=queues, interval=interval, ttl=ttl, families=families
    )


def test_a_heartbeat_advertises_the_worker_with_a_ttl(client: redis.Redis) -> None:
    beat = heartbeat(client)
    beat.beat(now=1000.0)
    [info] = live_workers(client, now=1001.0)
    assert (info.hostname, info.models, info.queues) == ("gpu0@host", MODELS, ["render.tiny-sd15", "render.tiny-sdxl"])
    assert (info.last_seen, info.ttl, info.pid) == (1000.0, 15, os.getpid())
    assert (info.loaded, info.loads, info.job, info.step, info.total) == ([], {}, None, None, None)
    assert 14_000 < client.pttl(worker_key("gpu0@host")) <= 15_000
    assert client.zscore(WORKERS, "gpu0@host") == 1000.0
    assert [client.zscore(model_workers_key(model), "gpu0@host") for model in MODELS] == [1000.0, 1000.0]


def test_a_worker_that_stops_beating_drops_out_within_its_ttl(client: redis.Redis) -> None:
    beat = heartbeat(client, ttl=0.5)
    beat.beat()
    beaten = time.monotonic()
    assert [info.hostname for info in live_workers(client)] == ["gpu0@host"]
    wait_until(lambda: not live_workers(client), timeout=10, what="the worker's advert to expire")
    assert 0.4 < time.monotonic() - beaten < 3
    assert served_models(client, MODELS, ttl=0.5) == {"tiny-sd15": 0, "tiny-sdxl": 0}


def test_stop_withdraws_the_worker_at_once_and_nothing_revives_it(client: redis.Redis) -> None:
    beat = heartbeat(client, interval=0.05)
    beat.start("gpu1@host")
    wait_until(lambda: client.exists(worker_key("gpu1@host")) == 1, timeout=10, what="the first heartbeat")
    advert = JobAdvert(client, "gpu1@host", fresh_registry())
    advert.job_started("job-1")
    assert live_workers(client)[0].job == "job-1"

    beat.stop()
    assert live_workers(client) == [] and served_models(client, MODELS) == {"tiny-sd15": 0, "tiny-sdxl": 0}
    assert client.zcard(WORKERS) == 0 and client.exists(worker_key("gpu1@host")) == 0
    advert.job_ended()  # the warm shutdown's last job ends after the worker left the fleet
    beat.beat()
    assert client.exists(worker_key("gpu1@host")) == 0 and client.zcard(WORKERS) == 0


def test_old_index_entries_are_pruned_and_entries_without_a_hash_are_not_live(client: redis.Redis) -> None:
    now = time.time()
    client.zadd(WORKERS, {"long-gone": now - 1000, "just-died": now - 1})
    client.zadd(model_workers_key("tiny-sd15"), {"long-gone": now - 1000})
    heartbeat(client).beat(now=now)
    assert client.zrange(WORKERS, 0, -1) == [b"just-died", b"gpu0@host"]
    assert client.zrange(model_workers_key("tiny-sd15"), 0, -1) == [b"gpu0@host"]
    assert [info.hostname for info in live_workers(client, now=now)] == ["gpu0@host"]


def test_live_workers_are_sorted_with_what_each_advertises(client: redis.Redis) -> None:
    registry = fresh_registry()
    for name in ("b@host", "a@host"):
        heartbeat(client, name).beat()
    advert = JobAdvert(client, "b@host", registry)
    advert.job_started("job-7")
    assert live_workers(client)[1].job == "job-7" and live_workers(client)[1].step is None
    registry.pipeline("tiny-sd15")
    advert.progress(3, 10)

    a, b = live_workers(client)
    assert (a.hostname, a.job, a.loaded, a.loads) == ("a@host", None, [], {})
    assert (b.hostname, b.job, b.step, b.total) == ("b@host", "job-7", 3, 10)
    assert (b.loaded, b.loads) == (["tiny-sd15"], {"tiny-sd15": 1})
    advert.job_ended()
    b = live_workers(client)[1]
    assert (b.job, b.step, b.total, b.loaded, b.loads) == (None, None, None, ["tiny-sd15"], {"tiny-sd15": 1})
    assert served_by([a, b]) == MODELS


def test_served_models_counts_workers_beating_within_the_ttl(client: redis.Redis) -> None:
    heartbeat(client, "a@host").beat(now=1000.0)
    Heartbeat(client, hostname="b@host", models=["tiny-sd15"], queues=[], interval=5, ttl=15).beat(now=1010.0)
    assert served_models(client, ["tiny-sd15", "tiny-sdxl", "nope"], ttl=15, now=1012.0) == {
        "tiny-sd15": 2,
        "tiny-sdxl": 1,
        "nope": 0,
    }
    assert served_models(client, ["tiny-sd15", "tiny-sdxl"], ttl=15, now=1020.0) == {"tiny-sd15": 1, "tiny-sdxl": 0}


def test_queue_lengths_read_every_priority_list(client: redis.Redis) -> None:
    lists = priority_lists(model_queue("render", "tiny-sd15"))
    client.lpush(lists["high"], "x")
    client.lpush(lists["normal"], "x", "y", "z")
    client.lpush(priority_lists(model_queue("render", "tiny-sdxl"))["low"], "x", "y")
    assert queue_lengths(client, "render", MODELS) == {
        "tiny-sd15": {"high": 1, "normal": 3, "low": 0},
        "tiny-sdxl": {"high": 0, "normal": 0, "low": 2},
    }


def test_advertising_never_fails_a_job() -> None:
    unreachable = control_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    advert = JobAdvert(unreachable, "gpu0@host", fresh_registry())
    advert.job_started("job-1")
    advert.progress(1, 10)
    advert.job_ended()
    JobAdvert(unreachable, None, fresh_registry()).job_started("job-2")  # no worker hostname: nothing to advertise


def test_a_hung_redis_does_not_stall_every_step() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        hung = control_client(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=0.3)
        advert = JobAdvert(hung, "gpu0@host", fresh_registry(), backoff=60)
        advert.progress(1, 100)  # waits out one socket timeout
        started = time.monotonic()
        for step in range(2, 100):
            advert.progress(step, 100)
        assert time.monotonic() - started < 0.1
        hung.close()


def test_a_model_load_is_counted_once_and_cache_hits_are_not() -> None:
    def loads() -> float:
        return REGISTRY.get_sample_value("render_model_loads_total", {"model": "tiny-sd15"}) or 0.0

    registry = fresh_registry()
    before = loads()
    registry.pipeline("tiny-sd15")
    assert loads() == before + 1
    registry.pipeline("tiny-sd15")
    registry.pipeline("tiny-sd15", "img2img")  # a variant shares the loaded model's modules
    assert loads() == before + 1
    assert registry.loads == {"tiny-sd15": 1} and registry.loaded_models() == ["tiny-sd15"]


def test_the_heartbeat_ttl_must_exceed_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_HEARTBEAT_INTERVAL", "5")
    monkeypatch.setenv("RENDER_HEARTBEAT_TTL", "5")
    with pytest.raises(ConfigError, match=r"RENDER_HEARTBEAT_TTL \(5 s\) must exceed RENDER_HEARTBEAT_INTERVAL"):
        load_settings()
    monkeypatch.delenv("RENDER_HEARTBEAT_TTL")
    assert (load_settings().heartbeat_interval, load_settings().heartbeat_ttl) == (5, 15)


def render_workers(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return render_cli("workers", *args, env={"RENDER_REDIS_URL": server.url})


def test_render_workers_shows_the_fleet_and_its_queues(server: RedisServer, client: redis.Redis) -> None:
    nobody = render_workers(server)
    assert nobody.returncode == 0 and nobody.stdout.startswith("no live worker:") and nobody.stdout.count("\n") == 1

    registry = fresh_registry()
    heartbeat(client, "gpu0@host").beat()
    advert = JobAdvert(client, "gpu0@host", registry)
    advert.job_started("job-1")
    registry.pipeline("tiny-sd15")
    advert.progress(4, 20)
    client.lpush(priority_lists(model_queue("render", "tiny-sd15"))["low"], "x", "y")

    table = render_workers(server)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "gpu0@host" in line).split()
    assert row[:8] == ["gpu0@host", "tiny-sd15,", "tiny-sdxl", "tiny-sd15", "job-1", "4/20", "tiny-sd15", "1"]
    assert row[8:] in (["0", "s", "ago", "sd15,", "sdxl", "default"], ["1", "s", "ago", "sd15,", "sdxl", "default"])
    assert "\x1b[" not in table.stdout  # not a terminal: plain text
    queued = next(line for line in table.stdout.splitlines() if line.split()[:1] == ["tiny-sd15"]).split()
    assert queued == ["tiny-sd15", "0", "0", "2"]

    as_json = json.loads(render_workers(server, "--json").stdout)
    [info] = as_json["workers"]
    assert (info["hostname"], info["job"], info["step"], info["total"]) == ("gpu0@host", "job-1", 4, 20)
    assert info["loads"] == {"tiny-sd15": 1} and info["models"] == MODELS
    assert info["families"] == {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
    assert as_json["queues"]["tiny-sd15"] == {"high": 0, "normal": 0, "low": 2}
