"""Deadlines of jobs no worker takes, through a real worker: the recovery scan ends them `expired` on their queue.

One worker serving tiny-sd15 only, with the tenant `team-a` whose `deadline_seconds` (3 s) applies to its jobs that
set none, and a recovery scan every 0.5 s. A job stuck behind a long backlog, and a job for a model no live worker
serves, both end `expired` while they wait, with no image stored and nothing rendered.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import boto3
import pytest

from producer import queued as queued_jobs
from producer.client import RenderClient
from producer.keys import deadlines_key
from producer.settings import ClientSettings
from producer.tenants import queued
from producer.webhooks import SIGNATURE_HEADER, verify
from tests.helpers import render_cli, wait_until
from tests.integration.conftest import LONG, WEBHOOK_SECRET, Farm, Receiver, spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SD15 = {"tiny-sd15": {"family": "sd15", "source": "tiny"}}
TENANTS = {"team-a": {"deadline_seconds": 3}}


@pytest.fixture(scope="module")
def farm(farm_factory: Callable[[], Farm]) -> Farm:
    """One worker, holding one job at a time (no prefetch), so that a backlog waits on the queue."""
    made = farm_factory()
    made.start_workers(
        "deadlines", models=json.dumps(SD15), tenants=json.dumps(TENANTS), prefetch="0", recovery_interval="0.5"
    )
    return made


def as_team_a(farm: Farm) -> dict[str, str]:
    """The environment of the `render` command run by team-a."""
    return {"RENDER_REDIS_URL": farm.redis_url, "RENDER_TENANT": "team-a"}


def stored(farm: Farm, task_id: str) -> list[str]:
    """The objects in the job's storage folder (`renders/team-a@<id>/` for a tenant's job)."""
    prefix = f"renders/{task_id}/"
    listing = boto3.client("s3", endpoint_url=farm.s3_endpoint).list_objects_v2(Bucket=farm.bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix) for o in listing.get("Contents", []))


def test_a_job_behind_a_long_backlog_expires_on_its_queue_at_its_tenants_deadline(farm: Farm) -> None:
    team_a = farm.client.as_tenant("team-a")
    backlog = team_a.submit_many([LONG | {"seed": i, "deadline_seconds": 600} for i in range(8)])  # a spec's wins
    wait_until(lambda: backlog[0].status().state in ("started", "progress"), timeout=120, what="the backlog to start")
    late = team_a.submit(spec(callbacks=[{"type": "frames", "every": 1}]))  # no deadline of its own: the tenant's
    assert farm.redis.zscore(deadlines_key("team-a"), late.task_id) is not None

    wait_until(lambda: late.status().done, timeout=120, what="the late job to end")
    behind = team_a.statuses([h.task_id for h in backlog[-3:]])
    final = late.status()
    manifest = final.manifest
    assert final.state == "expired" and manifest is not None
    assert manifest.error == "deadline of 3 s passed while it waited in its queue: no worker was free to start it"
    assert final.error == manifest.error
    assert manifest.spec["deadline_seconds"] == 3  # RENDER_TENANTS' default, applied at submit
    assert manifest.steps_completed == 0 and manifest.images == [] and manifest.frames == []
    assert manifest.timings.queue_wait is not None and manifest.timings.queue_wait >= 3
    assert stored(farm, late.task_id) == ["manifest.json"]  # no image, no frame
    # It never reached the worker: the jobs submitted before it were still waiting their turn when it expired.
    assert [s.state for s in behind] == ["queued"] * 3, behind
    assert farm.redis.zscore(deadlines_key("team-a"), late.task_id) is None  # the scan is done with it

    counts = farm.client.revoke_many([h.task_id for h in backlog])  # the rest of the backlog is not this test's
    assert counts["dequeued"] >= 3
    wait_until(
        lambda: all(s.done for s in team_a.statuses([h.task_id for h in backlog])), timeout=120, what="the backlog"
    )


def test_a_job_for_a_model_no_worker_serves_says_so_then_expires(farm: Farm, receiver: Receiver) -> None:
    client = RenderClient(ClientSettings(redis_url=farm.redis_url, tenant="team-a", webhook_hosts=["127.0.0.1"]))
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        # Its own deadline, long enough for `render status` to see it waiting first.
        handle = client.submit(
            spec(model="tiny-sdxl", deadline_seconds=15, webhook=url), wait_for_worker=True, priority="low"
        )
        shown = render_cli("status", handle.task_id, env=as_team_a(farm))
        assert shown.returncode == 0, shown.stderr
        assert "waiting: no live worker serves tiny-sdxl" in shown.stdout, shown.stdout

        wait_until(lambda: handle.status().done, timeout=120, what="the unserved job to end")
        final = handle.status()
        assert final.state == "expired" and final.manifest is not None
        assert final.error == "deadline of 15 s passed while it waited in its queue: no live worker serves tiny-sdxl"
        assert final.manifest.images == [] and final.manifest.steps_completed == 0
        assert stored(farm, handle.task_id) == ["manifest.json"]
        assert queued(farm.redis, "team-a", ["render.tiny-sdxl"]) == 0  # off its queue: no worker will find it

        wait_until(lambda: bool(receiver.posts), timeout=60, what="the expired job's webhook")
        [(headers, body)] = receiver.posts
        assert verify(WEBHOOK_SECRET, body, headers[SIGNATURE_HEADER])
        assert json.loads(body)["status"] == "expired"

        after = render_cli("status", handle.task_id, env=as_team_a(farm))
        assert f"{handle.task_id}: expired" in after.stdout and final.error in after.stdout, after.stdout
    finally:
        client.close()


def test_queued_jobs_are_found_and_taken_off_past_the_first_chunk_of_a_long_queue(farm: Farm) -> None:
    """The shared dequeue (producer.queued) that the scan and `revoke_many` use, on a queue longer than one read."""
    team_a = farm.client.as_tenant("team-a")
    handles = team_a.submit_many(
        [spec(model="tiny-sdxl", seed=i, deadline_seconds=600) for i in range(queued_jobs.CHUNK + 200)],
        wait_for_worker=True,
    )
    oldest, middle, newest = handles[0], handles[queued_jobs.CHUNK + 50], handles[-1]
    wanted = {oldest.task_id, middle.task_id, newest.task_id}
    found = queued_jobs.find(farm.redis, ["team-a@render.tiny-sdxl"], wanted)
    assert {item.task_id for item in found} == wanted
    message = next(item for item in found if item.task_id == middle.task_id).message()
    assert message is not None and message.attempt == 1 and message.queue == "team-a@render.tiny-sdxl"
    assert json.loads(message.spec)["seed"] == queued_jobs.CHUNK + 50 and message.submitted_at is not None

    assert {item.task_id for item in queued_jobs.take_off(farm.redis, found)} == wanted
    assert queued_jobs.take_off(farm.redis, found) == []  # gone already: what a worker's pop in between looks like
    counts = farm.client.revoke_many([h.task_id for h in handles])
    assert counts["dequeued"] == len(handles) - 3
    assert queued(farm.redis, "team-a", ["render.tiny-sdxl"]) == 0
