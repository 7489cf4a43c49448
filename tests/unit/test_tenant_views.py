"""The tenant where people look: the manifest, `render status`, `render workers` and its queue counts, the metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import redis
from prometheus_client import REGISTRY

from localfarm.cluster import RedisServer
from producer.fleet import queue_lengths, tenant_queue_lengths
from producer.keys import model_queue, priority_lists, tenant_queue
from producer.manifest import Manifest
from producer.spec import RenderSpec
from producer.status import TaskStatus
from producer.tenants import TenantConfig, publish
from tests.helpers import render_cli
from worker import metrics
from worker.engine.job import JobContext
from worker.engine.record import JobRecord
from worker.models.registry import ModelRegistry
from worker.process.fleet import Heartbeat, JobAdvert
from worker.storage.local import LocalStorage
from worker.views.status_view import status_dict, status_line

MODELS = ["tiny-sd15", "tiny-sdxl"]
ZERO = {"high": 0, "normal": 0, "low": 0}


def queued(client: redis.Redis, tenant: str, model: str, priority: str, count: int) -> None:
    client.lpush(priority_lists(tenant_queue(model_queue("render", model), tenant))[priority], *["x"] * count)


def test_queue_lengths_count_every_declared_tenant_s_lists(client: redis.Redis) -> None:
    publish(client, {"team-a": TenantConfig(weight=2), "team-b": TenantConfig()})
    queued(client, "default", "tiny-sd15", "normal", 1)
    queued(client, "team-a", "tiny-sd15", "normal", 2)
    queued(client, "team-a", "tiny-sd15", "high", 1)
    queued(client, "team-b", "tiny-sdxl", "low", 3)
    queued(client, "team-z", "tiny-sd15", "low", 5)  # not declared: no worker takes it, and it is not counted

    by_tenant = tenant_queue_lengths(client, "render", MODELS)
    assert by_tenant == {
        "default": {"tiny-sd15": {**ZERO, "normal": 1}, "tiny-sdxl": ZERO},
        "team-a": {"tiny-sd15": {"high": 1, "normal": 2, "low": 0}, "tiny-sdxl": ZERO},
        "team-b": {"tiny-sd15": ZERO, "tiny-sdxl": {**ZERO, "low": 3}},
    }
    assert queue_lengths(client, "render", MODELS) == {
        "tiny-sd15": {"high": 1, "normal": 3, "low": 0},
        "tiny-sdxl": {"high": 0, "normal": 0, "low": 3},
    }
    # A tenant's client counts its own lists only (its Redis user may read no other tenant's).
    assert queue_lengths(client, "render", MODELS, ["team-a"]) == {
        "tiny-sd15": {"high": 1, "normal": 2, "low": 0},
        "tiny-sdxl": ZERO,
    }


def test_queue_lengths_without_declared_tenants_are_the_default_tenant_s(client: redis.Redis) -> None:
    queued(client, "default", "tiny-sdxl", "high", 2)
    assert tenant_queue_lengths(client, "render", ["tiny-sdxl"]) == {"default": {"tiny-sdxl": {**ZERO, "high": 2}}}


def render_workers(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    return render_cli("workers", *args, env={"RENDER_REDIS_URL": server.url})


def test_render_workers_shows_the_tenant_of_each_job_in_hand_and_of_the_queued_jobs(
    server: RedisServer, client: redis.Redis, registry: ModelRegistry
) -> None:
    publish(client, {"team-a": TenantConfig()})
    for hostname in ("gpu0@host", "gpu1@host"):
        Heartbeat(client, hostname=hostname, models=MODELS, queues=[], interval=5, ttl=15).beat()
    JobAdvert(client, "gpu0@host", registry).job_started("team-a@job-1")
    queued(client, "default", "tiny-sd15", "low", 1)
    queued(client, "team-a", "tiny-sd15", "low", 2)

    table = render_workers(server)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "tenant" in next(line for line in lines if line.split()[:1] == ["worker"]).split()
    busy = next(line for line in lines if "gpu0@host" in line).split()
    idle = next(line for line in lines if "gpu1@host" in line).split()
    assert "team-a@job-1" in busy and busy[-1] == "team-a"
    assert "idle" in idle and idle[-1] == "-"

    # The queue table's rows: the workers' table above may wrap a cell (its loads, say) onto a line of a model's name.
    queue_lines = lines[next(i for i, line in enumerate(lines) if "jobs queued" in line) :]

    def row(model: str) -> str:
        return " ".join(next(line for line in queue_lines if line.split()[:1] == [model]).split())

    assert row("tiny-sd15") == "tiny-sd15 0 0 3 default 1, team-a 2", "every tenant's jobs, and each one's share"
    assert row("tiny-sdxl") == "tiny-sdxl 0 0 0 -"

    shown = json.loads(render_workers(server, "--json").stdout)
    assert [(info["hostname"], info["job"], info["tenant"]) for info in shown["workers"]] == [
        ("gpu0@host", "team-a@job-1", "team-a"),
        ("gpu1@host", None, None),
    ]
    assert shown["queues"]["tiny-sd15"] == {"high": 0, "normal": 0, "low": 3}
    assert shown["queues_by_tenant"]["team-a"]["tiny-sd15"] == {"high": 0, "normal": 0, "low": 2}
    assert shown["queues_by_tenant"]["default"]["tiny-sd15"] == {"high": 0, "normal": 0, "low": 1}


def manifest(task_id: str, **fields: object) -> Manifest:
    return Manifest.model_validate(
        {
            "task_id": task_id,
            "status": "succeeded",
            "steps_planned": 10,
            "steps_completed": 10,
            "spec": {},
            "seed": 1,
            "worker": "gpu0@host",
            "started_at": "2026-01-01T00:00:00.000+00:00",
            "finished_at": "2026-01-01T00:00:01.000+00:00",
            **fields,
        }
    )


def test_a_manifest_written_before_tenants_reads_as_the_default_tenant_s() -> None:
    assert manifest("old-job").tenant == "default"
    assert json.loads(manifest("team-a@job", tenant="team-a").model_dump_json())["tenant"] == "team-a"


def test_the_worker_records_the_job_s_tenant_in_its_manifest(tmp_path: Path) -> None:
    spec = RenderSpec.model_validate({"model": "tiny-sd15", "prompt": "a lighthouse", "seed": 1})
    storage = LocalStorage(tmp_path)
    for task_id, tenant, folder in (("team-a@job-1", "team-a", "team-a@job-1"), ("job-2", "default", "job-2")):
        written = JobRecord(JobContext(spec, task_id)).finish(storage, "failed", error="a test")
        stored = json.loads((tmp_path / folder / "manifest.json").read_text())
        assert written.tenant == stored["tenant"] == tenant and stored["task_id"] == task_id


def test_render_status_shows_the_tenant() -> None:
    done = TaskStatus("team-a@job-1", "succeeded", 10, 10, manifest("team-a@job-1", tenant="team-a", images=["i.png"]))
    assert status_line(done) == "team-a@job-1: succeeded 10/10 steps, images: i.png, tenant: team-a"
    as_json = status_dict(done)
    assert as_json["tenant"] == as_json["manifest"]["tenant"] == "team-a"
    waiting = TaskStatus("job-2", "queued", waiting="no live worker serves tiny-sdxl")
    assert status_line(waiting) == "job-2: queued, waiting: no live worker serves tiny-sdxl"  # default: as before
    assert status_dict(waiting)["tenant"] == "default"
    assert status_line(TaskStatus("nobody", "unknown")) == "nobody: unknown", "an unknown id is no tenant's job"


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_job_metrics_carry_the_tenant() -> None:
    jobs = {"status": "succeeded", "tenant": "team-m"}
    before = count("render_jobs_total", **jobs), count("render_queue_wait_seconds_count", tenant="team-m")
    metrics.record(manifest("team-m@job", tenant="team-m", timings={"queue_wait": 0.5}))
    after = count("render_jobs_total", **jobs), count("render_queue_wait_seconds_count", tenant="team-m")
    assert (after[0] - before[0], after[1] - before[1]) == (1.0, 1.0)
    failed = count("render_jobs_total", status="failed", tenant="team-n")
    metrics.failed("team-n@job")
    assert count("render_jobs_total", status="failed", tenant="team-n") == failed + 1
