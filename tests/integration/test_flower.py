"""Flower, a real process on the test Redis with basic auth, sees the workers' jobs and progress events."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import free_port, http_answers, wait_until
from tests.integration.conftest import Farm, spec
from worker.celery_app import consumed_queues
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = ("ops", "s3cret-flower")


@pytest.fixture(scope="module")
def flower(farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",  # the app from RENDER_* settings, as an operator starts Flower
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Basic auth from the environment, as docker-compose.yml gives it: no password on the command line.
            env={**os.environ, "RENDER_REDIS_URL": farm.redis_url, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_answers(url + "/healthcheck"), timeout=60, what="flower", process=process, log=log)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def fetch(url: str, auth: tuple[str, str] | None = AUTH) -> str:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:  # a worker page waits for the workers' replies
        return str(response.read().decode())


def get(url: str, auth: tuple[str, str] | None = AUTH) -> Any:
    return json.loads(fetch(url, auth))


def test_flower_sees_jobs_and_their_progress(farm: Farm, flower: str) -> None:
    # Flower subscribes to the event stream after it answers HTTP: it is listening once it has counted
    # events from both workers (their heartbeats).
    def listening() -> bool:
        return {row["hostname"].split("@")[0] for row in get(f"{flower}/workers?json=1")["data"]} >= {"alpha", "beta"}

    wait_until(listening, timeout=60, what="Flower's event stream")
    handle = farm.client.submit(spec(num_inference_steps=40, width=128, height=128))
    (manifest,) = farm.finish([handle])
    info: dict[str, Any] = {}

    def seen_succeeded() -> bool:
        nonlocal info
        try:
            info = get(f"{flower}/api/task/info/{handle.task_id}")
        except urllib.error.HTTPError:
            info = {}
        return info.get("state") == "SUCCESS"

    wait_until(seen_succeeded, timeout=60, what="the job's success in Flower")
    assert info["name"] == "render.run" and info["worker"].startswith(("alpha@", "beta@"))
    workers = get(f"{flower}/workers?json=1")["data"]  # one row per worker, with its event counters
    progress_events = sum(row.get("task-progress", 0) for row in workers)
    assert progress_events >= 2, f"Flower counted no task-progress events: {workers}"
    assert manifest.status == "succeeded"
    assert handle.task_id in get(f"{flower}/api/tasks")


def test_flower_refuses_requests_without_credentials(flower: str) -> None:
    for auth in (None, ("ops", "wrong")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"{flower}/api/tasks", auth=auth)
        assert refused.value.code == 401


def test_flower_s_worker_pages_broker_tab_and_queue_lengths(farm: Farm, flower: str) -> None:
    """The pages that read the workers' stats (over Celery's remote control) and the queues (from Redis)."""
    queues = consumed_queues(WorkerSettings())  # the farm's workers serve the default models
    for worker in farm.workers:
        page = fetch(f"{flower}/worker/{urllib.parse.quote(worker.hostname)}")
        assert "Unable to get stats" not in page
        # The worker's stats, as its page shows them: its pid, and its broker connection in the Broker tab.
        assert f">{worker.pid}<" in page.replace(" ", "") and "worker.process.transport:Transport" in page
    broker = fetch(f"{flower}/broker")
    shown = farm.redis_url.replace("redis://", "redis://:**@")  # kombu masks the password, even an absent one
    assert f">{shown}</p>" in broker, "the Broker tab names the farm's Redis"
    for queue in queues:
        assert f"<td>{queue}</td>" in broker, f"the Broker tab does not list {queue}"
    lengths = get(f"{flower}/api/queues/length")["active_queues"]
    assert sorted(row["name"] for row in lengths) == sorted(queues)
    assert all(row["messages"] == 0 for row in lengths), lengths  # every job of the earlier test has run
