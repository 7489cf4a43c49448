"""Redis restarted (with its append-only file) mid-batch, and unreachable for a few seconds mid-render.

The revocation check inside the step callback fails **open**: while Redis does not answer the render
goes on (a revoke sent then takes effect when Redis is back). A lease not renewed for a whole ttl is
lost: that render stops, writes nothing, and the job is done once more, by whichever worker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from producer.errors import FarmUnavailable
from tests.faults.conftest import ChaosFarm, assert_complete, job, progressed

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def test_redis_restarted_mid_batch_keeps_every_job_and_everyone_reconnects(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("rr-a", "rr-b", torch_threads="1")
    assert farm.server is not None
    handles = farm.client.submit_many([job(200 + i, num_inference_steps=60) for i in range(12)])
    wait_until(lambda: sum(farm.client.status(h.task_id).done for h in handles) >= 2, timeout=60, what="2 done")
    queued_before = farm.queued()
    assert queued_before >= 4, "the restart must find jobs still queued"

    farm.server.stop()  # SIGTERM: Redis writes its append-only file and exits
    time.sleep(1.0)
    farm.server.start()

    manifests = farm.finish(handles)
    assert [m.status for m in manifests] == ["succeeded"] * len(handles)
    for handle, manifest in zip(handles, manifests, strict=True):
        assert_complete(farm, handle.task_id, manifest)
    after = farm.client.submit(job(299, num_inference_steps=4))  # producer and workers are back
    assert farm.finish([after])[0].status == "succeeded"
    assert all(w.process is not None and w.process.poll() is None for w in farm.workers)
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")


def test_redis_unreachable_for_seconds_the_render_rides_through(chaos_farm: Callable[..., ChaosFarm]) -> None:
    farm = chaos_farm()
    farm.start_workers("ru", torch_threads="1", lease_ttl="15")
    assert farm.redis_proxy is not None
    handle = farm.client.submit(job(300, num_inference_steps=150, width=320, height=320))
    wait_until(progressed(farm, handle.task_id, 10), timeout=60, what="10 steps")
    connections = farm.redis_proxy.connections
    with farm.redis_proxy.outage(3.0):
        with pytest.raises(FarmUnavailable, match=r"cannot reach the farm's Redis at redis://127\.0\.0\.1:\d+/0"):
            farm.client.status(handle.task_id)  # the producer sees the outage as one clear error ...

    (manifest,) = farm.finish([handle])  # ... and reconnects by itself afterwards
    assert manifest.status == "succeeded" and manifest.attempt == 1
    assert manifest.steps_completed == manifest.steps_planned == 150
    assert farm.redis_proxy.connections > connections, "clients reconnected through the proxy"
    log = farm.log_text()
    assert re.search(r"revocation channel \S+ unreachable \(rendering on", log), "the revocation watch saw the outage"
    assert "was lost" not in log, "a 3 s outage under a 15 s lease must not lose the lease"
    # A revoke after the outage still works: the watch resubscribed.
    revoked = farm.client.submit(job(301, num_inference_steps=150, width=320, height=320))
    wait_until(progressed(farm, revoked.task_id, 5), timeout=60, what="5 steps")
    assert revoked.revoke() == "revoked"
    final = list(farm.client.follow(revoked.task_id, interval=0.05, timeout=60))[-1]
    assert final.state == "revoked" and final.manifest is not None and final.manifest.steps_completed < 150


def test_redis_away_longer_than_the_lease_the_render_stops_and_the_job_is_done_once(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("lost-a", "lost-b", torch_threads="1", lease_ttl="2")
    assert farm.redis_proxy is not None
    handle = farm.client.submit(job(400, num_inference_steps=150, width=320, height=320))
    wait_until(progressed(farm, handle.task_id, 10), timeout=60, what="10 steps")
    with farm.redis_proxy.outage(5.0):
        pass

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2
    assert manifest.steps_completed == 150
    assert_complete(farm, handle.task_id, manifest)
    assert "was lost: Redis did not answer for a whole lease ttl" in farm.log_text()
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")
