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
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from producer.keys import manifest_object, model_queue, tenant_queue
from tests.helpers import free_port, http_answers, render_cli, wait_until
from tests.integration.conftest import Farm, spec
from worker.celery_app import consumed_queues
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AUTH = ("ops", "s3cret-flower")
TENANTS = json.dumps({"team-a": {"weight": 2}})


@pytest.fixture(scope="module")
def farm(farm_factory: Callable[[], Farm]) -> Farm:
    """Two workers that also take tenant team-a's jobs (RENDER_TENANTS; each publishes it to Redis at start)."""
    made = farm_factory()
    made.start_workers("alpha", "beta", tenants=TENANTS)
    return made


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


def wait_listening(flower: str) -> None:
    """Flower subscribes to the event stream after it answers HTTP: it is listening once it has counted
    events from both workers (their heartbeats)."""

    def listening() -> bool:
        return {row["hostname"].split("@")[0] for row in get(f"{flower}/workers?json=1")["data"]} >= {"alpha", "beta"}

    wait_until(listening, timeout=60, what="Flower's event stream")


def succeeded_in_flower(flower: str, task_id: str) -> dict[str, Any]:
    """The task's info in Flower's API once Flower has seen it succeed."""
    info: dict[str, Any] = {}

    def seen_succeeded() -> bool:
        nonlocal info
        try:
            info = get(f"{flower}/api/task/info/{urllib.parse.quote(task_id)}")
        except urllib.error.HTTPError:
            info = {}
        return info.get("state") == "SUCCESS"

    wait_until(seen_succeeded, timeout=60, what=f"{task_id}'s success in Flower")
    return info


def test_flower_sees_jobs_and_their_progress(farm: Farm, flower: str) -> None:
    wait_listening(flower)
    handle = farm.client.submit(spec(num_inference_steps=40, width=128, height=128))
    (manifest,) = farm.finish([handle])
    info = succeeded_in_flower(flower, handle.task_id)
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


def test_a_tenant_s_job_shows_its_tenant_in_flower_its_manifest_and_render_status(farm: Farm, flower: str) -> None:
    """Flower shows a tenant's job's id and routing key, both `team-a@...`; the manifest and `render status` name the
    tenant."""
    wait_listening(flower)  # so Flower hears the task-sent event, which carries the routing key
    handle = farm.client.as_tenant("team-a").submit(spec())
    assert handle.task_id.startswith("team-a@")
    (manifest,) = farm.finish([handle])
    assert (manifest.status, manifest.tenant) == ("succeeded", "team-a")
    stored = boto3.client("s3", endpoint_url=farm.s3_endpoint).get_object(
        Bucket=farm.bucket, Key=f"renders/{manifest_object(handle.task_id)}"
    )
    assert json.loads(stored["Body"].read())["tenant"] == "team-a", "the stored manifest, in the tenant's folder"

    info = succeeded_in_flower(flower, handle.task_id)
    queue = tenant_queue(model_queue("render", "tiny-sd15"), "team-a")
    assert (info["uuid"], info["routing_key"]) == (handle.task_id, queue) and queue.startswith("team-a@")
    page = fetch(f"{flower}/task/{urllib.parse.quote(handle.task_id)}")
    assert f'<code class="text-body-secondary">{handle.task_id}</code>' in page, "the task page's UUID"
    assert f"<dt>Routingkey</dt><dd>{queue}</dd>" in "".join(page.split()), "the task page's routing key"

    env = {"RENDER_REDIS_URL": farm.redis_url}
    shown = json.loads(render_cli("status", handle.task_id, "--json", env=env).stdout)
    assert (shown["tenant"], shown["state"], shown["manifest"]["tenant"]) == ("team-a", "succeeded", "team-a")
    assert render_cli("status", handle.task_id, env=env).stdout.endswith(", tenant: team-a\n")
