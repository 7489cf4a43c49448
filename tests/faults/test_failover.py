"""Redis Sentinel failover mid-batch: a master, a replica and three sentinels on loopback (the redis-server binary
runs as a sentinel too); the master is SIGKILLed while jobs render and queue. After the failover every job ends
exactly once, a revoke still reaches a running job, and producers and workers reconnect by themselves."""

from __future__ import annotations

import functools
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import RenderClient
from producer.settings import ClientSettings
from tests.faults.conftest import job, progressed
from tests.helpers import free_port, wait_until
from tests.integration.conftest import Farm

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]
MASTER = "farm"


class SentinelGroup:
    """A master, one replica of it and three sentinels watching them, each its own process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        for name in ("master", "replica"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        self.master = RedisServer(workdir=workdir / "master", appendonly=True).start()
        self.replica = RedisServer(
            workdir=workdir / "replica",
            appendonly=True,
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        ).start()
        self.sentinels: list[tuple[int, subprocess.Popen[bytes]]] = []
        for index in range(3):
            port = free_port()
            conf = workdir / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir}/sentinel-{index}.log\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            process = subprocess.Popen(
                [self.master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.sentinels.append((port, process))
        for port, _ in self.sentinels:
            wait_until(
                functools.partial(self.knows_everyone, port),
                timeout=60,
                what=f"sentinel :{port} to know the replica and the other sentinels",
            )

    def knows_everyone(self, port: int) -> bool:
        sentinel = redis.Redis(port=port, socket_timeout=2)
        replicas: Any = sentinel.sentinel_slaves(MASTER)
        others: Any = sentinel.sentinel_sentinels(MASTER)
        return len(replicas) == 1 and len(others) == 2

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port, _ in self.sentinels)

    def master_port(self) -> int:
        address = redis.Redis(port=self.sentinels[0][0], socket_timeout=2).sentinel_get_master_addr_by_name(MASTER)
        return int(address[1])  # type: ignore[index]

    def close(self) -> None:
        for _, process in self.sentinels:
            process.kill()
            process.wait()
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    made = SentinelGroup(tmp_path)
    try:
        yield made
    finally:
        made.close()


def test_a_master_killed_mid_batch_fails_over_and_every_job_ends_exactly_once(
    group: SentinelGroup, s3_server: str, tmp_path: Path
) -> None:
    bucket = f"failover-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    client = RenderClient(ClientSettings(redis_url=group.url, redis_master_name=MASTER))
    farm = Farm(group.url, bucket, s3_server, tmp_path / "logs", client)
    (tmp_path / "logs").mkdir()
    try:
        farm.start_workers("fo-a", "fo-b", redis_master_name=MASTER, lease_ttl="8", torch_threads="1")
        handles = client.submit_many([job(400 + i, num_inference_steps=60) for i in range(10)])
        wait_until(
            lambda: sum(client.status(h.task_id).state == "progress" for h in handles) >= 1,
            timeout=120,
            what="a job rendering",
        )
        master = redis.Redis(port=group.master.port, socket_timeout=5)
        done_before = sum(client.status(h.task_id).done for h in handles)
        assert done_before <= len(handles) - 4, "the failover must find jobs rendering and queued"
        assert master.wait(1, 5000) == 1, "the replica has every write before the master dies"
        old_port = group.master.port
        assert group.master.process is not None
        group.master.process.kill()  # SIGKILL: no goodbye, the sentinels notice after 1 s
        wait_until(lambda: group.master_port() != old_port, timeout=60, what="the sentinels' failover")
        assert group.master_port() == group.replica.port

        manifests = farm.finish(handles)
        assert [m.status for m in manifests] == ["succeeded"] * len(handles)
        storage = boto3.client("s3", endpoint_url=s3_server)
        for handle, manifest in zip(handles, manifests, strict=True):
            assert farm.objects(handle.task_id) == ["image-0.png", "manifest.json"]
            result = client.app.AsyncResult(handle.task_id)
            assert result.state == "SUCCESS" and result.result["finished_at"] == manifest.finished_at
            stored = storage.get_object(Bucket=bucket, Key=f"renders/{handle.task_id}/manifest.json")["Body"].read()
            assert json.loads(stored)["finished_at"] == manifest.finished_at, "rendered again after it ended"

        # After the failover: a revoke reaches a running job (its worker's watch resubscribed on the new master)
        # and the producer, whose client found the new master by itself, submits as before.
        long = client.submit(job(450, num_inference_steps=150, width=320, height=320))
        wait_until(progressed(farm, long.task_id, 5), timeout=120, what="the long job past step 5")  # type: ignore[arg-type]
        assert long.revoke() == "revoked"
        assert long.wait(timeout=120).status == "revoked"
        after = client.submit(job(451, num_inference_steps=4))
        assert after.wait(timeout=120).status == "succeeded"
        assert all(w.process is not None and w.process.poll() is None for w in farm.workers), "no worker died"
    finally:
        WorkerProcess.stop_all(farm.workers)
        client.close()
