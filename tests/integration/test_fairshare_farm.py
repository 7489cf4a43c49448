"""Fair share between tenants on a real worker: a small tenant's jobs start within a few jobs of a large backlog,
not after it; each tenant's jobs start in submit order."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from localfarm.cluster import wait_until
from producer.client import JobHandle, RenderClient
from producer.manifest import Manifest
from tests.integration.conftest import Farm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

log = logging.getLogger(__name__)

SD15 = {"tiny-sd15": {"family": "sd15", "source": "tiny"}}
BOUND = 20
"""The issue's bound: every job of B starts before A's 20th job after B's submit."""


def job(seed: int) -> dict[str, object]:
    return {
        "model": "tiny-sd15",
        "prompt": "a lighthouse",
        "num_inference_steps": 1,
        "width": 64,
        "height": 64,
        "seed": seed,
    }


def started(manifest: Manifest) -> float:
    return datetime.fromisoformat(manifest.started_at).timestamp()


def test_a_small_tenant_starts_within_a_few_jobs_of_a_large_backlog(farm_factory: Callable[[], Farm]) -> None:
    farm = farm_factory()
    tenants: dict[str, dict[str, int]] = {"team-a": {}, "team-b": {}}
    farm.start_workers("fair", models=json.dumps(SD15), tenants=json.dumps(tenants))
    team_a, team_b = farm.client.as_tenant("team-a"), farm.client.as_tenant("team-b")
    backlog = team_a.submit_many([job(i) for i in range(200)])
    wait_until(lambda: team_a.status(backlog[2].task_id).done, timeout=120, what="the backlog to be under way")
    b_submitted = time.time()
    small = team_b.submit_many([job(1000 + i) for i in range(5)])
    urgent = team_a.submit_many([job(2000 + i) for i in range(3)], priority="high")  # priorities win over turns
    b_manifests = [handle.wait(timeout=180) for handle in small]
    high = [handle.wait(timeout=180) for handle in urgent]
    assert [m.status for m in b_manifests + high] == ["succeeded"] * 8
    b_last = max(started(m) for m in b_manifests)
    assert max(started(m) for m in high) <= b_last, "a high job of A waited for B's normal ones"
    farm.client.revoke_many([h.task_id for h in backlog])  # the rest of the backlog is not this test's
    a_done = [m for m in _finished(team_a, backlog) if m.status == "succeeded"]
    between = [m for m in a_done + high if b_submitted <= started(m) <= b_last]
    log.info("A's jobs started while B's 5 waited: %d (bound %d)", len(between), BOUND)
    assert len(between) < BOUND, f"{len(between)} of A's jobs started while B's 5 waited"
    for handles, manifests in ((backlog, a_done), (urgent, high), (small, b_manifests)):  # FIFO per priority
        order = [m.task_id for m in sorted(manifests, key=lambda m: (started(m), m.task_id))]
        assert order == [h.task_id for h in handles if h.task_id in order], "jobs started out of submit order"


def _finished(client: RenderClient, handles: list[JobHandle]) -> list[Manifest]:
    """The manifests of the jobs of `handles` that are final, once none is still running."""
    ids = [h.task_id for h in handles]

    def settled() -> bool:
        return all(s.state not in ("started", "progress") for s in client.statuses(ids))

    wait_until(settled, timeout=120, what="the backlog's running jobs to end")
    return [s.manifest for s in client.statuses(ids) if s.manifest is not None]
