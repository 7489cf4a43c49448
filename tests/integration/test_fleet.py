"""`render workers` against a real worker: listed within a heartbeat, its job and loads shown, gone when it dies."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.fleet import WorkerInfo, served_models
from producer.keys import worker_key
from tests.helpers import render_cli, wait_until
from tests.integration.conftest import LONG, Farm, spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).parents[2]
INTERVAL, TTL = 0.5, 2.0


def render_workers(farm: Farm, *args: str) -> subprocess.CompletedProcess[str]:
    return render_cli("workers", *args, env={"RENDER_REDIS_URL": farm.redis_url})


def listed(farm: Farm, hostname: str) -> WorkerInfo | None:
    return next((info for info in farm.client.workers() if info.hostname == hostname), None)


SD_MODELS = json.dumps(
    {name: {"family": name.removeprefix("tiny-"), "source": "tiny"} for name in ("tiny-sd15", "tiny-sdxl")}
)


def test_a_worker_is_listed_shows_its_job_and_loads_and_drops_out_when_killed(
    farm_factory: Callable[[], Farm],
) -> None:
    farm = farm_factory()
    [worker] = farm.start_workers("fleet-a", heartbeat_interval=str(INTERVAL), heartbeat_ttl=str(TTL), models=SD_MODELS)
    ready = time.monotonic()  # it answers a Celery ping: consuming, and its first beat went out as it got ready
    wait_until(lambda: listed(farm, worker.hostname) is not None, timeout=30, what="the worker's first heartbeat")
    assert time.monotonic() - ready < INTERVAL + 1.0
    shown = json.loads(render_workers(farm, "--json").stdout)
    [info] = shown["workers"]
    assert (info["hostname"], info["models"], info["loaded"], info["job"]) == (
        worker.hostname,
        ["tiny-sd15", "tiny-sdxl"],
        [],
        None,
    )
    assert info["ttl"] == TTL and set(shown["queues"]) == {"tiny-sd15", "tiny-sdxl"}

    long = farm.client.submit(LONG)
    wait_until(
        lambda: (
            (current := listed(farm, worker.hostname)) is not None
            and current.job == long.task_id
            and (current.step or 0) >= 1
        ),
        timeout=60,
        what="the job in hand and its step in the worker's advert",
    )
    long.revoke()
    assert long.wait(timeout=60).status == "revoked"
    assert farm.client.submit(spec()).wait(timeout=60).status == "succeeded"  # a cache hit: no second load
    wait_until(
        lambda: getattr(listed(farm, worker.hostname), "job", 0) is None, timeout=10, what="the job to be cleared"
    )
    after = listed(farm, worker.hostname)
    assert after is not None and (after.loaded, after.loads) == (["tiny-sd15"], {"tiny-sd15": 1})
    table = render_workers(farm)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if worker.hostname in line).split()
    assert row[:8] == [worker.hostname, "tiny-sd15,", "tiny-sdxl", "tiny-sd15", "idle", "-", "tiny-sd15", "1"]

    worker.kill()
    killed = time.monotonic()
    wait_until(lambda: listed(farm, worker.hostname) is None, timeout=30, what="the killed worker to drop out")
    assert time.monotonic() - killed < TTL + 1.5  # its advert expires one TTL after its last beat at the latest
    assert served_models(farm.redis, ["tiny-sd15"], ttl=TTL) == {"tiny-sd15": 0}
    assert render_workers(farm).stdout.startswith("no live worker:")


def test_a_gracefully_stopped_worker_drops_out_at_once(farm_factory: Callable[[], Farm]) -> None:
    farm = farm_factory()
    [worker] = farm.start_workers("fleet-b", heartbeat_interval=str(INTERVAL), heartbeat_ttl=str(TTL))
    wait_until(lambda: listed(farm, worker.hostname) is not None, timeout=30, what="the worker's first heartbeat")
    worker.stop()
    assert farm.client.workers() == []
    assert farm.redis.exists(worker_key(worker.hostname)) == 0
    assert served_models(farm.redis, ["tiny-sd15", "tiny-sdxl"], ttl=TTL) == {"tiny-sd15": 0, "tiny-sdxl": 0}
