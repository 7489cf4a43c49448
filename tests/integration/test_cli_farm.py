"""The CLI against a real farm: submit, follow, status, revoke, fetch, as the README shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from producer.keys import TASK_RENDER
from tests.helpers import render_cli
from tests.integration.conftest import LONG, Farm, spec, wait_for
from worker.settings import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).parents[2]


def cli(farm: Farm, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "RENDER_REDIS_URL": farm.redis_url,
        "RENDER_STORAGE_URL": f"s3://{farm.bucket}/renders",
        "RENDER_S3_ENDPOINT_URL": farm.s3_endpoint,
    }
    return render_cli(*args, env=env)


def test_submit_wait_status_fetch(farm: Farm, tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(num_images=2, callbacks=[{"type": "frames", "every": 5}])))
    done = cli(farm, "submit", str(path), "--wait", "--task-id", "cli-wait")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"

    status = cli(farm, "status", "cli-wait")
    assert status.stdout.startswith("cli-wait: succeeded 10/10 steps, images: s3://")
    as_json = json.loads(cli(farm, "status", "cli-wait", "--json").stdout)
    assert as_json["state"] == "succeeded" and len(as_json["manifest"]["images"]) == 2

    fetched = cli(farm, "fetch", "cli-wait", "--out", str(tmp_path))
    assert fetched.returncode == 0, fetched.stderr
    names = sorted(p.relative_to(tmp_path / "cli-wait").as_posix() for p in (tmp_path / "cli-wait").rglob("*.*"))
    assert names == ["frames/step-005.png", "frames/step-010.png", "image-0.png", "image-1.png", "manifest.json"]


def test_submit_then_revoke_from_another_process(farm: Farm, tmp_path: Path) -> None:
    path = tmp_path / "long.json"
    path.write_text(json.dumps(LONG))
    submitted = cli(farm, "submit", str(path))
    task_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(task_id) == 32
    wait_for(farm, task_id, lambda s: s.state == "progress")
    revoked = cli(farm, "revoke", task_id)
    assert revoked.stdout.startswith(f"revoked {task_id}: it stops at its next step")
    assert wait_for(farm, task_id, lambda s: s.done).state == "revoked"
    assert cli(farm, "revoke", task_id).stdout.startswith(f"{task_id} has already finished; nothing to revoke")
    assert cli(farm, "revoke", "nobody").stdout.startswith("no task nobody is known; nothing to revoke")
    assert cli(farm, "status", "nobody").stdout == "nobody: unknown\n"
    not_fetchable = cli(farm, "fetch", "nobody")
    assert not_fetchable.returncode == 2 and not_fetchable.stderr.startswith("error: task nobody is unknown")


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    from tests.helpers import free_port

    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "RENDER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: cannot reach the farm's Redis at redis://127.0.0.1:")
        and result.stderr.count("\n") == 1
    ), result.stderr


def test_celery_s_own_cli_finds_the_app_from_the_render_settings(farm: Farm) -> None:
    """`celery -A worker.celery_app inspect ...` as an operator types it: every live worker answers each command."""
    env = {**os.environ, "RENDER_REDIS_URL": farm.redis_url}
    # Named destinations: Celery then returns once each has answered instead of collecting for the whole timeout.
    hostnames = {worker.hostname: worker for worker in farm.workers}
    destination = ",".join(hostnames)
    # The commands run side by side: each one's start (importing the worker's modules, ~5 s) is most of its time.
    commands = {
        method: subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "inspect", method, "--json"]
            + ["--timeout", "30", "--destination", destination],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for method in ("stats", "active", "registered")
    }
    replies: dict[str, dict[str, Any]] = {}
    try:
        for method, process in commands.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, f"inspect {method}: {err}"
            replies[method] = json.loads(out)
    finally:
        for process in commands.values():
            process.kill()
            process.wait()
    for method, reply in replies.items():
        assert set(reply) == set(hostnames), f"inspect {method} answered by {sorted(reply)}, not {sorted(hostnames)}"
    for hostname, worker in hostnames.items():
        stats = replies["stats"][hostname]
        assert stats["pid"] == worker.pid and stats["pool"]["max-concurrency"] == WorkerSettings().jobs_in_hand
        assert stats["broker"]["transport"] == "worker.process.transport:Transport"
        assert replies["active"][hostname] == []
        assert TASK_RENDER in replies["registered"][hostname]
