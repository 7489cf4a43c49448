"""Through a real worker: a job whose `deadline_seconds` passes behind a long one ends `expired` without rendering,
and a rendering job's progress names its newest stored frame."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from producer.status import TaskStatus
from tests.integration.conftest import LONG, Farm, spec, wait_for


@pytest.fixture(scope="module")
def one_worker(farm_factory: Callable[[], Farm]) -> Farm:
    """A farm with a single worker, so that a second job waits behind the first."""
    made = farm_factory()
    made.start_workers("solo")
    return made


def test_a_job_past_its_deadline_behind_a_long_one_expires_without_rendering(one_worker: Farm) -> None:
    farm = one_worker
    slow = farm.client.submit(LONG)
    wait_for(farm, slow.task_id, lambda s: s.state in ("started", "progress"))
    late = farm.client.submit(spec(deadline_seconds=0.2, callbacks=[{"type": "frames", "every": 1}], webhook=None))
    ended, expired = farm.finish([slow, late])

    assert ended.status == "succeeded"
    assert expired.status == "expired"
    assert expired.error == "deadline of 0.2 s passed before a worker started it"
    assert expired.steps_completed == 0 and expired.images == [] and expired.frames == []
    final = farm.client.status(late.task_id)
    assert final.state == "expired" and final.done and final.error == expired.error
    assert farm.objects(late.task_id) == ["manifest.json"]  # no image, no frame was ever stored


def test_progress_names_the_newest_frame_while_it_renders(one_worker: Farm) -> None:
    farm = one_worker
    handle = farm.client.submit(LONG | {"deadline_seconds": 600, "callbacks": [{"type": "frames", "every": 10}]})
    seen: list[TaskStatus] = []
    for status in farm.client.follow(handle.task_id, interval=0.05, timeout=120):
        seen.append(status)
    previews = [s for s in seen if s.state == "progress" and s.frame]
    assert previews, f"no progress named a frame: {[(s.state, s.step, s.frame) for s in seen]}"
    manifest = seen[-1].manifest
    assert manifest is not None and manifest.status == "succeeded"
    assert all(s.frame in manifest.frames for s in previews)
    steps = [int(s.frame.rsplit("step-", 1)[1].split(".")[0]) for s in previews if s.frame]
    assert steps == sorted(steps)
