"""A farm for fault tests: its own persistent redis-server, and break-able proxies in front of Redis and S3.

Workers and the producer talk to Redis and S3 through `FaultProxy`s; tests inspect the real servers
directly, so a fault never hides what actually happened.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import RenderClient
from producer.keys import RUNNING_TASKS, model_queue, priority_lists
from producer.settings import ClientSettings
from tests.faults.proxy import FaultProxy
from tests.integration.conftest import Farm, farm_factory, redis_server  # noqa: F401  (fixtures used here)
from worker.settings import default_models


@dataclass
class ChaosFarm(Farm):
    """A `Farm` whose workers and client go through proxies. `direct` reads Redis without the proxy."""

    server: RedisServer | None = None
    redis_proxy: FaultProxy | None = None
    s3_proxy: FaultProxy | None = None

    @property
    def direct(self) -> redis.Redis:
        assert self.server is not None
        return redis.Redis.from_url(self.server.url, socket_timeout=5)

    def start_workers(self, *names: str, ready: bool = True, **settings: str) -> list[Any]:
        assert self.s3_proxy is not None
        defaults = {"s3_endpoint_url": f"http://{self.s3_proxy.address}", "storage_retry_seconds": "20"}
        return super().start_workers(*names, ready=ready, **(defaults | settings))

    def queued(self) -> int:
        """Jobs waiting in any priority list of the models' queues or the bare one."""
        queues = ["render", *(model_queue("render", model) for model in default_models())]
        return sum(self.direct.llen(name) for queue in queues for name in priority_lists(queue).values())

    def queue_is_empty(self) -> bool:
        """Nothing waiting, nothing delivered and unacknowledged, nothing listed as running."""
        db = self.direct
        return not self.queued() and not db.hlen("unacked") and not db.hlen(RUNNING_TASKS)

    def stored_manifest(self, task_id: str) -> dict[str, Any] | None:
        """The manifest in the bucket, read straight from the S3 server; None when there is none."""
        if "manifest.json" not in self.objects(task_id):
            return None
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint)
        body = s3.get_object(Bucket=self.bucket, Key=f"renders/{task_id}/manifest.json")["Body"].read()
        data: dict[str, Any] = json.loads(body)
        return data

    def log_text(self) -> str:
        return "".join(w.log_path.read_text(errors="replace") for w in self.workers if w.log_path.exists())


def job(seed: int, **overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-sd15",
        "prompt": f"kill test {seed}",
        "num_inference_steps": 40,
        "width": 128,
        "height": 128,
        "seed": seed,
        **overrides,
    }


def holder(farm: ChaosFarm, task_id: str) -> WorkerProcess:
    record = json.loads(farm.direct.hget(RUNNING_TASKS, task_id) or b"{}")
    return next(w for w in farm.workers if record.get("worker", "").startswith(w.hostname + ":"))


def assert_complete(farm: ChaosFarm, task_id: str, manifest: Any) -> None:
    names = farm.objects(task_id)
    images = [f"image-{i}.png" for i in range(manifest.spec["num_images"])]
    assert [n for n in names if n.startswith("image-")] == images
    assert [n.rsplit("/", 1)[1] for n in names if n.startswith("frames/")] == [
        u.rsplit("/", 1)[1] for u in manifest.frames
    ]
    assert "manifest.json" in names


def progressed(farm: ChaosFarm, task_id: str, steps: int) -> Callable[[], bool]:
    def check() -> bool:
        current = farm.client.status(task_id)
        return current.state == "progress" and (current.step or 0) >= steps

    return check


def blocked_consumers(db: redis.Redis) -> set[int]:
    """The Redis client ids of connections blocked in a worker's wait for a job (kombu's BRPOP, or the BLMOVE that
    waits without popping)."""
    return {int(c["id"]) for c in db.client_list() if c.get("cmd") in ("brpop", "blmove") and "b" in c.get("flags", "")}


def cut_held(proxy: FaultProxy) -> None:
    """Close every connection through `proxy` while `hold()` keeps the server's answers: what the server sent on them
    is lost, as when Redis stops with replies unflushed. New connections are accepted at once."""
    proxy.cut()
    proxy.release()  # the pumps that held answers now find their sockets closed


@pytest.fixture
def chaos_farm(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ChaosFarm]]:
    """Makes farms on their own redis-server (AOF, fsync always); stops every process they started."""
    made: list[ChaosFarm] = []

    def make(*, password: str | None = None) -> ChaosFarm:
        workdir: Path = tmp_path_factory.mktemp("chaos-redis")
        server = RedisServer(workdir=workdir, appendonly=True, password=password).start()
        redis_proxy = FaultProxy(server.port).start()
        s3_proxy = FaultProxy(int(s3_server.rsplit(":", 1)[1])).start()
        auth = f":{password}@" if password else ""
        url = f"redis://{auth}{redis_proxy.address}/0"
        bucket = f"chaos-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        client = RenderClient(ClientSettings(redis_url=url))
        farm = ChaosFarm(
            url,
            bucket,
            s3_server,
            tmp_path_factory.mktemp("chaos-logs"),
            client,
            server=server,
            redis_proxy=redis_proxy,
            s3_proxy=s3_proxy,
        )
        made.append(farm)
        return farm

    yield make
    for farm in made:
        WorkerProcess.stop_all(farm.workers)
        farm.client.close()
        assert farm.redis_proxy is not None and farm.s3_proxy is not None and farm.server is not None
        farm.redis_proxy.close()
        farm.s3_proxy.close()
        farm.server.stop()
