"""Access: Redis with a password and over TLS; no secret (Redis password, S3 secret key) in any log,
manifest, Redis value or error message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from localfarm.cluster import free_port, wait_until
from producer import FarmUnavailable
from producer.client import RenderClient
from tests.conftest import FAKE_AWS
from tests.faults.conftest import ChaosFarm
from tests.integration.conftest import Farm

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

AWS_SECRET = FAKE_AWS["AWS_SECRET_ACCESS_KEY"]


def everything_in_redis(client: redis.Redis) -> bytes:
    chunks: list[Any] = []
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"hash":
            chunks.extend(k + v for k, v in client.hgetall(key).items())  # type: ignore[operator]
        elif kind == b"list":
            chunks.extend(client.lrange(key, 0, -1))
        elif kind == b"set":
            chunks.extend(client.smembers(key))
        elif kind == b"zset":
            chunks.extend(client.zrange(key, 0, -1))
        chunks.append(key)
    return b"\n".join(chunks)


def everything_in_the_bucket(farm: Farm) -> bytes:
    s3 = boto3.client("s3", endpoint_url=farm.s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=farm.bucket).get("Contents", [])]
    return b"\n".join(s3.get_object(Bucket=farm.bucket, Key=k)["Body"].read() for k in keys if k.endswith(".json"))


def test_no_secret_reaches_logs_manifests_redis_or_errors(chaos_farm: Callable[..., ChaosFarm]) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    farm = chaos_farm(password=password)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == AWS_SECRET, "the workers inherit the S3 secret: the test can fail"
    farm.start_workers("vault", metrics_port=str(free_port()))
    base = {"model": "tiny-sd15", "prompt": "secret-free", "num_inference_steps": 20, "width": 64, "height": 64}
    ok = farm.client.submit(base | {"callbacks": [{"type": "frames", "every": 10}]})
    assert farm.finish([ok])[0].status == "succeeded"
    bad = farm.client.app.send_task("render.run", args=['{"model": "nope", "prompt": "x"}'])
    assert list(farm.client.follow(bad.id, interval=0.05, timeout=60))[-1].state == "failed"
    revoked = farm.client.submit(base | {"num_inference_steps": 150, "width": 256, "height": 256})
    wait_until(lambda: revoked.status().state == "progress", timeout=60, what="progress")
    revoked.revoke()
    list(farm.client.follow(revoked.task_id, interval=0.05, timeout=60))

    wrong = RenderClient(redis_url=farm.redis_url.replace(password, f"wrong-{password}"))
    with pytest.raises(FarmUnavailable) as refused:
        wrong.status(ok.task_id)
    wrong.close()
    messages = str(refused.value)
    assert ":***@" in messages

    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json", ok.task_id],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RENDER_REDIS_URL": farm.redis_url},
    )
    assert cli.returncode == 0 and '"succeeded"' in cli.stdout, cli.stderr

    assert farm.server is not None
    places = {
        "worker logs": farm.log_text().encode(),
        "redis": everything_in_redis(redis.Redis.from_url(farm.server.url)),
        "bucket manifests": everything_in_the_bucket(farm),
        "client errors": messages.encode(),
        "cli": (cli.stdout + cli.stderr).encode(),
    }
    assert all(places.values()), "every place holds something to search"
    for where, text in places.items():
        for secret in (password.encode(), AWS_SECRET.encode()):
            assert secret not in text, f"a secret appears in the {where}"


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """redis-server with TLS only (no plain port), its certificate signed by a CA made here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    run = lambda *args: subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=render-test-ca")  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--bind",
            "127.0.0.1",
        ],  # fmt: skip
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.pem'}"
    try:
        try:
            wait_until(lambda: answers(url), timeout=20, what="TLS redis", process=process)
        except RuntimeError:
            pytest.skip("this redis-server was built without TLS")
        yield url, tmp_path / "ca.pem"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_a_farm_over_tls_redis_renders_and_refuses_an_unverified_server(
    tls_redis: tuple[str, Path], s3_server: str, tmp_path: Path
) -> None:
    url, _ = tls_redis
    bucket = f"tls-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    farm = Farm(url, bucket, s3_server, tmp_path, RenderClient(redis_url=url))
    try:
        farm.start_workers("tls")
        handle = farm.client.submit(
            {"model": "tiny-sd15", "prompt": "tls", "num_inference_steps": 4, "width": 64, "height": 64}
        )
        assert farm.finish([handle])[0].status == "succeeded"
        unverified = RenderClient(redis_url=url.split("&ssl_ca_certs=")[0])  # the system CAs do not know ours
        with pytest.raises(FarmUnavailable, match="certificate verify failed"):
            unverified.status(handle.task_id)
        unverified.close()
    finally:
        for worker in farm.workers:
            worker.stop()
        farm.client.close()
