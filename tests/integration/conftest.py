"""Real services for the distributed path: a private redis-server, the S3 test server, `render worker` processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import redis

from producer.client import RenderClient
from producer.settings import ClientSettings
from worker.local_cluster import RedisServer, WorkerProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


WEBHOOK_SECRET = "farm-webhook-secret"
_databases = iter(range(1, 64))  # RedisServer starts with 64 databases


@dataclass
class Farm:
    """A Redis database of its own, a bucket of its own, a client, and the workers started on them."""

    redis_url: str
    bucket: str
    s3_endpoint: str
    logs: Path
    client: RenderClient
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def redis(self) -> redis.Redis:
        return self.client.redis

    def start_workers(self, *names: str, ready: bool = True, **settings: str) -> list[WorkerProcess]:
        env = {
            "RENDER_REDIS_URL": self.redis_url,
            "RENDER_STORAGE_URL": f"s3://{self.bucket}/renders",
            "RENDER_S3_ENDPOINT_URL": self.s3_endpoint,
            "RENDER_DEVICE": "cpu",
            "RENDER_LEASE_TTL": "2",
            "RENDER_RECOVERY_INTERVAL": "0.5",
            "RENDER_PROGRESS_INTERVAL": "0.1",
            # Two or three workers share this machine's cores: one torch thread each, or their thread pools
            # oversubscribe the cores and every job runs several times slower (docs/benchmarks.md).
            "RENDER_TORCH_THREADS": "1",
            # Webhooks to a receiver the test runs on loopback, signed with a known key, retried quickly.
            "RENDER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "RENDER_WEBHOOK_HOSTS": "127.0.0.1",
            "RENDER_WEBHOOK_BACKOFF_SECONDS": "0.2",
            **{f"RENDER_{k.upper()}": v for k, v in settings.items()},
        }
        started = [WorkerProcess(name, env, self.logs / f"{name}.log").start() for name in names]
        for worker in started if ready else ():
            worker.wait_ready(self.client.app, timeout=90)
        self.workers.extend(started)
        return started

    def objects(self, task_id: str) -> list[str]:
        listing = boto3.client("s3", endpoint_url=self.s3_endpoint).list_objects_v2(
            Bucket=self.bucket, Prefix=f"renders/{task_id}/"
        )
        return sorted(o["Key"].removeprefix(f"renders/{task_id}/") for o in listing.get("Contents", []))


@pytest.fixture(scope="module")
def farm_factory(
    redis_server: RedisServer, s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Farm]]:
    farms: list[Farm] = []

    def make() -> Farm:
        url = f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
        redis.Redis.from_url(url).flushdb()
        bucket = f"farm-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        client = RenderClient(ClientSettings(redis_url=url))
        farms.append(Farm(url, bucket, s3_server, tmp_path_factory.mktemp("worker-logs"), client))
        return farms[-1]

    yield make
    for farm in farms:
        WorkerProcess.stop_all(farm.workers)
        farm.client.close()


@pytest.fixture(scope="module")
def farm(farm_factory: Callable[[], Farm]) -> Farm:
    """Two workers shared by the tests of a module."""
    made = farm_factory()
    made.start_workers("alpha", "beta")
    return made
