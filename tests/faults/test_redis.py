"""Redis restarted (with its append-only file) mid-batch, and unreachable for a few seconds mid-render.

A reply that hands a worker its job and never arrives (Redis stopping with it unflushed, a cut connection) must not
lose the job: the worker's dequeue records the delivery in the step that takes the job off its list.

The revocation check inside the step callback fails **open**: while Redis does not answer the render
goes on (a revoke sent then takes effect when Redis is back). A lease not renewed for a whole ttl is
lost: that render stops, writes nothing, and the job is done once more, by whichever worker.
"""

from __future__ import annotations

import json
import re
import select
import time
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from producer.client import RenderClient
from producer.errors import FarmUnavailable
from producer.settings import ClientSettings
from tests.faults.conftest import ChaosFarm, assert_complete, blocked_consumers, cut_held, job, progressed
from worker.celery_app import create_app
from worker.process import fairshare
from worker.settings import WorkerSettings

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


def test_the_reply_handing_a_worker_its_job_is_lost_and_the_job_is_still_done(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    """The CI failure made exact: the server answers the worker's wait for a job, and the connection dies before the
    answer arrives. With a popping BRPOP the job was then in no list, not unacknowledged and not leased: lost."""
    farm = chaos_farm()
    farm.start_workers("reply-lost")
    proxy, db = farm.redis_proxy, farm.direct
    assert proxy is not None and farm.server is not None

    def held_while_waiting() -> bool:
        proxy.hold()  # the worker's wait stays blocked on the server; whatever the server answers now is kept
        if blocked_consumers(db):
            return True
        proxy.release()
        return False

    wait_until(held_while_waiting, timeout=60, what="the worker waiting for a job, its answers held")
    (waiting,) = blocked_consumers(db)
    submitter = RenderClient(ClientSettings(redis_url=farm.server.url))  # not through the held proxy
    try:
        handle = submitter.submit(job(500, num_inference_steps=4))
        wait_until(lambda: waiting not in blocked_consumers(db), timeout=30, what="the server answering the wait")
        cut_held(proxy)  # the answer dies with its connection
        (manifest,) = farm.finish([handle], stall=60)
    finally:
        submitter.close()
    assert manifest.status == "succeeded" and manifest.attempt == 1
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")


def test_a_job_popped_by_a_worker_that_never_read_the_reply_is_restored_and_done(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    """A worker's poll takes the job off its list and the worker never reads the reply (killed, or its connection
    cut): the job is an unacknowledged delivery without a lease, which the fleet's recovery puts back in its grace."""
    farm = chaos_farm()
    assert farm.server is not None
    submitter = RenderClient(ClientSettings(redis_url=farm.server.url))
    try:
        handle = submitter.submit(job(501, num_inference_steps=4), wait_for_worker=True)
    finally:
        submitter.close()
    queue = f"render.{job(0)['model']}"
    app = create_app(WorkerSettings(redis_url=farm.server.url))
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        channel.basic_consume(queue, False, lambda message: None, "doomed")
        channel.client.script_load(fairshare.POP)  # as any worker's first poll leaves it
        channel.connection.cycle._register_BRPOP(channel)  # the worker's poll goes out ...
        sock = channel.client.connection._sock
        assert select.select([sock], [], [], 30)[0], "the server answered the poll"
        channel.client.connection.disconnect()  # ... and its answer is never read
        channel._in_poll = None
    assert farm.queued() == 0, "the poll took the job off its list"
    (delivery,) = farm.direct.hvals("unacked")
    assert json.loads(delivery)[0]["headers"]["id"] == handle.task_id

    farm.start_workers("restorer")
    (manifest,) = farm.finish([handle], stall=60)
    assert manifest.status == "succeeded"
    assert "was delivered 2+ s ago and never started; back on its queue" in farm.log_text()
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")
