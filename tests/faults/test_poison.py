"""A poison job: one that kills whichever worker runs it. It ends `failed` after RENDER_MAX_ATTEMPTS (3) deaths
instead of taking down worker after worker for ever, and the fleet goes on serving other jobs."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from producer.keys import RUNNING_TASKS
from tests.faults.conftest import ChaosFarm, holder, job
from tests.helpers import render_here

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def running_attempt(farm: ChaosFarm, task_id: str) -> int | None:
    """The attempt of the job's run a worker holds now (its record in `render:running`); None when none does."""
    raw = farm.direct.hget(RUNNING_TASKS, task_id)
    return int(json.loads(raw)["attempt"]) if raw else None


def test_a_job_that_kills_its_worker_at_every_attempt_ends_failed_after_three_and_the_fleet_serves_on(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("poison-a", "poison-b")  # RENDER_MAX_ATTEMPTS at its default, 3
    # 512x512: ~50 ms a step on one core, so each run holds the job for seconds, however soon it is killed.
    handle = farm.client.submit(job(500, num_inference_steps=150, width=512, height=512))
    # Each run is killed once its worker's GPU takes it; a fresh worker takes the dead one's place.
    for attempt in (1, 2, 3):

        def on_gpu(attempt: int = attempt) -> bool:
            taken = handle.status().state in ("started", "progress")
            return taken and running_attempt(farm, handle.task_id) == attempt

        wait_until(on_gpu, timeout=120, what=f"attempt {attempt} on a GPU")
        victim = holder(farm, handle.task_id)
        victim.kill(signal.SIGKILL)
        victim.stop()
        farm.start_workers(f"poison-{attempt}", ready=False)

    reason = "its worker died 3 times during this job"
    wait_until(lambda: handle.status().state == "failed", timeout=120, what="the poison job failed")
    status = handle.status()
    assert status.error is not None and reason in status.error
    stored = farm.stored_manifest(handle.task_id)
    assert stored is not None and stored["status"] == "failed" and reason in stored["error"] and stored["attempt"] == 3
    shown = render_here("status", handle.task_id, env={"RENDER_REDIS_URL": farm.redis_url})
    assert shown.stdout.startswith(f"{handle.task_id}: failed") and reason in shown.stdout

    (other,) = farm.finish([farm.client.submit(job(501))])  # submitted after it, served by the fleet that is left
    assert other.status == "succeeded"
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue: the poison job is not sent again")
    assert running_attempt(farm, handle.task_id) is None and handle.status().state == "failed"
