"""Real services for the distributed path: a private redis-server, the S3 test server, `render worker` processes."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import JobHandle, RenderClient, TaskStatus
from producer.manifest import Manifest
from producer.settings import ClientSettings
from tests.helpers import wait_for_jobs, wait_until


def spec(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-sd15",
        "prompt": "a lighthouse",
        "num_inference_steps": 10,
        "width": 64,
        "height": 64,
        "seed": 1,
        **overrides,
    }


LONG = spec(num_inference_steps=150, width=256, height=256)  # about 2 s on the CI machine's two cores


def wait_for(farm: Farm, task_id: str, predicate: Any, timeout: float = 60) -> TaskStatus:
    """Poll the job's status until `predicate` holds (finely: tests act at a step); return that status."""
    seen: list[TaskStatus] = []

    def reached() -> bool:
        seen[:] = [farm.client.status(task_id)]
        return bool(predicate(seen[0]))

    wait_until(reached, timeout=timeout, what=f"{task_id} in the expected state", interval=0.02)
    return seen[0]


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
            # The JSON-list form; tests/integration/test_batch.py's workers use the comma form.
            "RENDER_WEBHOOK_HOSTS": '["127.0.0.1"]',
            "RENDER_WEBHOOK_BACKOFF_SECONDS": "0.2",
            **{f"RENDER_{k.upper()}": v for k, v in settings.items()},
        }
        # Forked warm from one process per test process that has imported torch, diffusers and Celery once
        # (`localfarm.warm`): seconds less per worker, and test files start dozens. RENDER_TEST_COLD_WORKERS=1
        # starts each as a new interpreter, as production does (the demo's test always does).
        warm = os.environ.get("RENDER_TEST_COLD_WORKERS", "") in ("", "0")
        started = [WorkerProcess(name, env, self.logs / f"{name}.log", warm=warm).start() for name in names]
        for worker in started if ready else ():
            worker.wait_ready(self.client.app, timeout=90)
        self.workers.extend(started)
        return started

    def finish(self, handles: Sequence[JobHandle], *, stall: float = 180) -> list[Manifest]:
        """The jobs' manifests once all are final; fails only if no job moves for `stall` seconds."""
        manifests = wait_for_jobs(self.client, [h.task_id for h in handles], stall=stall)
        missing = [h.task_id for h, m in zip(handles, manifests, strict=True) if m is None]
        assert not missing, f"these jobs ended with no manifest: {missing}"
        return manifests

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


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on loopback: every POST it answers 204 and keeps, headers and body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Hook)
        self.posts: list[tuple[dict[str, str], bytes]] = []


class Hook(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
