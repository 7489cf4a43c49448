"""A worker killed with SIGKILL mid-job: the job completes on the other worker, once, within a minute."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from localfarm.cluster import RedisServer
from producer.client import RenderClient
from producer.keys import (
    ATTEMPT_HEADER,
    LEASE_DEADLINES,
    PRIORITIES,
    RECOVERY_TURN,
    RUNNING_TASKS,
    active_list,
    job_key,
    lease_key,
    manifest_key,
    model_queue,
)
from producer.settings import ClientSettings
from tests.integration.conftest import Farm, spec, wait_for
from worker.celery_app import create_app
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_sigkilled_worker_job_completes_elsewhere_exactly_once(farm_factory) -> None:
    """In a fleet of a thousand: 1,000 other jobs run under live leases (other workers'), and the scan still
    finds the dead one within the lease ttl (2 s) and its interval (0.5 s), and only it."""
    farm: Farm = farm_factory()
    fleet = farm.redis.pipeline()
    for i in range(1000):
        other = {"spec": json.dumps(spec()), "queue": "render.elsewhere", "attempt": 1, "worker": f"w{i}@far:1"}
        fleet.set(lease_key(f"far-{i}"), f"w{i}@far:1:token", px=600_000)
        fleet.hset(RUNNING_TASKS, f"far-{i}", json.dumps(other))
        fleet.zadd(LEASE_DEADLINES, {f"far-{i}": (time.time() + 600) * 1000})
    fleet.execute()
    workers = {w.hostname: w for w in farm.start_workers("left", "right")}
    handle = farm.client.submit(spec(num_inference_steps=150, width=320, height=320, num_images=2), priority="low")
    wait_for(farm, handle.task_id, lambda s: s.state == "progress" and (s.step or 0) >= 5)

    record = json.loads(farm.redis.hget(RUNNING_TASKS, handle.task_id) or b"{}")
    # What recovery re-enqueues it with: its model's queue and its priority.
    assert (record["queue"], record["priority"]) == (model_queue("render", "tiny-sd15"), PRIORITIES["low"])
    assert farm.redis.lrange(active_list(record["queue"]), 0, -1) == [handle.task_id.encode()]
    victim = next(w for name, w in workers.items() if record["worker"].startswith(name + ":"))
    survivor = next(w for w in workers.values() if w is not victim)
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()

    manifest = handle.wait(timeout=90)
    recovered_in = time.monotonic() - killed_at
    assert manifest.status == "succeeded"
    assert manifest.attempt == 2 and manifest.worker.startswith(survivor.hostname + ":")
    assert recovered_in < 60, f"the job took {recovered_in:.1f} s to complete after its worker died"
    assert farm.objects(handle.task_id) == ["image-0.png", "image-1.png", "manifest.json"]
    assert not farm.redis.hexists(RUNNING_TASKS, handle.task_id)
    assert farm.redis.llen(active_list(record["queue"])) == 0, "the dead attempt's entry went with its recovery"
    assert farm.redis.llen("render.elsewhere") == 0 and farm.redis.zcard(LEASE_DEADLINES) == 1000, "only it"

    # A third delivery (the broker's own, after its visibility timeout) must not render again.
    again = farm.client.app.send_task("render.run", args=[json.dumps(manifest.spec)], task_id=handle.task_id)
    assert again.get(timeout=60)["finished_at"] == manifest.finished_at


def test_a_job_that_ends_while_the_scanner_looks_is_not_sent_again(redis_server: Any) -> None:
    """The scan lists running jobs, then checks each lease: a job that releases both in between has ended."""
    url = f"redis://127.0.0.1:{redis_server.port}/60"
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    app = create_app(WorkerSettings(redis_url=url))
    scanner = app.recovery_scanner
    record = {"spec": json.dumps(spec()), "queue": "render.tiny-sd15", "attempt": 1, "worker": "gone@host:1"}
    direct.hset(RUNNING_TASKS, "ending", json.dumps(record))
    direct.zadd(LEASE_DEADLINES, {"ending": 0})  # its lease has lapsed
    real_exists = scanner.client.exists

    def exists(*names: Any) -> Any:
        if lease_key("ending") in names:  # the job's own release lands between the listing and this check
            direct.hdel(RUNNING_TASKS, "ending")
        return real_exists(*names)

    scanner.client.exists = exists  # type: ignore[method-assign]  # the real call, with a release landing first
    try:
        assert scanner.scan_once() == []
        assert direct.llen("render.tiny-sd15") == 0, "an ended job was sent again"
    finally:
        app.close()
        direct.close()


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")  # Celery's Redis backend (upstream)
def test_a_job_whose_worker_died_after_its_manifest_and_before_its_result_ends_with_its_manifest(
    redis_server: Any,
) -> None:
    """Killed between the lease's release and Celery's result write: the job is done, its state said `progress`."""
    url = f"redis://127.0.0.1:{redis_server.port}/61"
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    app = create_app(WorkerSettings(redis_url=url))
    manifest = {"task_id": "done-job", "status": "succeeded", "steps_completed": 60, "images": ["file:///x.png"]}
    record = {"spec": json.dumps(spec()), "queue": "render.tiny-sd15", "attempt": 1, "worker": "gone@host:1"}
    direct.set(manifest_key("done-job"), json.dumps(manifest))
    direct.hset(RUNNING_TASKS, "done-job", json.dumps(record))
    direct.zadd(LEASE_DEADLINES, {"done-job": 0})
    app.backend.store_result("done-job", {"step": 60, "total": 60}, "PROGRESS")
    try:
        assert app.recovery_scanner.scan_once() == []
        result = AsyncResult("done-job", app=app)
        assert result.state == "SUCCESS" and result.result == manifest
        assert direct.llen("render.tiny-sd15") == 0 and not direct.hexists(RUNNING_TASKS, "done-job")
    finally:
        app.close()
        direct.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    """A redis-server of the test's own: its command count is the scan's alone (the session's server also serves
    other tests' idle workers, which poll it several times a second)."""
    with RedisServer(workdir=tmp_path) as server:
        yield server


def test_a_scan_reads_only_lapsed_leases_and_one_worker_of_the_fleet_scans_per_interval(own_redis: Any) -> None:
    """O(dead jobs): 300 jobs running under live leases and one whose worker died; the scan re-sends the dead one
    with a few commands, whatever the number running. Of several workers' scanners, one scans per interval."""
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    apps = [create_app(WorkerSettings(redis_url=url, recovery_interval=30)) for _ in range(3)]
    record = {"spec": json.dumps(spec()), "queue": "render.tiny-sd15", "attempt": 1, "worker": "w@host:1"}
    live = direct.pipeline()
    for i in range(300):
        live.set(lease_key(f"alive-{i}"), "w@host:1:token", px=60_000)
        live.hset(RUNNING_TASKS, f"alive-{i}", json.dumps(record))
        live.zadd(LEASE_DEADLINES, {f"alive-{i}": (time.time() + 60) * 1000})
    live.hset(RUNNING_TASKS, "dead", json.dumps(record))
    live.zadd(LEASE_DEADLINES, {"dead": (time.time() - 1) * 1000})  # lapsed a second ago, its lease key gone
    live.execute()
    try:
        before = direct.info("stats")["total_commands_processed"]
        assert apps[0].recovery_scanner.scan_once() == ["dead"]
        commands = direct.info("stats")["total_commands_processed"] - before
        assert commands < 100, f"the scan took {commands} commands for one dead job among 300 running"  # was 300+
        assert direct.llen("render.tiny-sd15") == 1 and not direct.hexists(RUNNING_TASKS, "dead")
        assert direct.zscore(LEASE_DEADLINES, "dead") is None and direct.zcard(LEASE_DEADLINES) == 300

        scans: list[str] = []

        def counted(real: Any) -> Any:
            def scan() -> list[str]:
                scans.append("scan")
                return real()

            return scan

        for app in apps:
            app.recovery_scanner.scan_once = counted(app.recovery_scanner.scan_once)  # type: ignore[method-assign]
        direct.delete(RECOVERY_TURN)
        for app in apps:
            app.recovery_scanner.tick()
        assert scans == ["scan"], "one worker of the three scanned this interval"
        assert 20_000 < direct.pttl(RECOVERY_TURN) <= 27_000, "its turn lasts most of the 30 s interval"
    finally:
        for app in apps:
            app.close()
        direct.close()


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")  # Celery's Redis backend (upstream)
def test_a_job_whose_worker_died_max_attempts_times_ends_failed_with_the_reason_and_is_not_sent_again(
    redis_server: Any, tmp_path: Path
) -> None:
    """RENDER_MAX_ATTEMPTS=2. Twice a worker dies holding the job before its GPU took it (a neighbour of what
    killed it): no death of this job's, sent again each time. Its run at attempt 3 dies on the GPU: sent again. A
    scan that sees that same dead run again (one that stopped after counting it) counts it once. The next run dies:
    two deaths, the job ends `failed` as the task would have ended it, and nothing is sent again. Submitted again
    under its id (as a batch resubmits its failed jobs), its deaths count from 0."""
    url = f"redis://127.0.0.1:{redis_server.port}/59"
    direct = redis.Redis.from_url(url)
    direct.flushdb()
    app = create_app(WorkerSettings(redis_url=url, storage_url=f"file://{tmp_path}", max_attempts=2))
    client = RenderClient(ClientSettings(redis_url=url))
    queue = "render.tiny-sd15"

    def died(attempt: int, worker: str, *, on_gpu: bool = True, submitted_at: float = 1000.0) -> None:
        """The record a dead run left, its lease gone; its progress if the GPU had taken it (step 5)."""
        if on_gpu:
            app.backend.store_result("poison", {"step": 5, "total": 10}, "PROGRESS")
        record = {"spec": json.dumps(spec()), "queue": queue, "attempt": attempt, "worker": worker}
        record["submitted_at"] = submitted_at
        direct.hset(RUNNING_TASKS, "poison", json.dumps({**record, "lease": f"{worker}:{attempt}abc"}))
        direct.rpush(active_list(queue), "poison")
        direct.zadd(LEASE_DEADLINES, {"poison": 0})

    def sent() -> list[int]:  # the attempt headers of the messages on the queue, taken off it
        messages = [json.loads(raw)["headers"][ATTEMPT_HEADER] for raw in direct.lrange(queue, 0, -1)]
        direct.delete(queue)
        return messages

    direct.hset(job_key("poison"), "queue", queue)  # the producer's record of the submission
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    try:
        died(1, "held@host:1", on_gpu=False)
        assert app.recovery_scanner.scan_once() == ["poison"] and sent() == [2]
        died(2, "held@host:2", on_gpu=False)
        assert app.recovery_scanner.scan_once() == ["poison"] and sent() == [3], "held, not run: no death"
        died(3, "first@host:1")
        assert app.recovery_scanner.scan_once() == ["poison"] and sent() == [4]
        assert client.status("poison").state == "queued", "re-sent, it waits on its queue again"
        died(3, "first@host:1")
        assert app.recovery_scanner.scan_once() == ["poison"] and sent() == [4], "one death, seen twice"
        died(4, "second@host:1")
        assert app.recovery_scanner.scan_once() == [] and sent() == []

        reason = "its worker died 2 times during this job"
        result = AsyncResult("poison", app=app)
        assert result.state == "FAILURE" and reason in str(result.result)
        status = client.status("poison")
        assert status.state == "failed" and status.error is not None and reason in status.error
        stored = json.loads((tmp_path / "poison" / "manifest.json").read_text())
        assert status.manifest is not None and status.manifest.model_dump(mode="json") == stored
        assert stored["status"] == "failed" and reason in stored["error"]
        assert (stored["attempt"], stored["worker"], stored["images"], stored["steps_completed"]) == (
            4,
            "second@host:1",
            [],
            5,
        )
        assert not (tmp_path / "poison" / "checkpoint.pt").exists(), "a final state deletes the checkpoint"
        assert not direct.hexists(RUNNING_TASKS, "poison") and direct.zscore(LEASE_DEADLINES, "poison") is None
        assert direct.llen(active_list(queue)) == 0
        assert app.recovery_scanner.scan_once() == [] and sent() == []

        direct.delete(manifest_key("poison"), app.backend.get_key_for_task("poison"))  # what a resubmission clears
        died(1, "third@host:1", submitted_at=2000.0)
        assert app.recovery_scanner.scan_once() == ["poison"] and sent() == [2], "a new submission's first death"
    finally:
        client.close()
        app.close()
        direct.close()
