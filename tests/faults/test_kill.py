"""Workers killed with SIGKILL: after delivery but before start, mid-steps, mid-upload, and at random points.

No job may be lost, none rendered by two workers at once, and no half-written result may ever be
visible as succeeded.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from producer.keys import RUNNING_TASKS
from tests.faults.conftest import ChaosFarm, assert_complete, holder, job, progressed
from tests.helpers import running

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def test_killed_after_delivery_before_start_the_job_is_put_back_and_done_once(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    (first,) = farm.start_workers("early")
    assert farm.redis_proxy is not None
    # The task's first Redis command is taking its lease: held there, before Redis sees it, the job has reached
    # the worker (it is in kombu's unacked hash) and has not started, however slow this machine is.
    held = farm.redis_proxy.hold_at(b"render:lease:")
    handle = farm.client.submit(job(1))
    wait_until(held.is_set, timeout=60, what="the delivered job's lease request")
    wait_until(lambda: farm.direct.hlen("unacked") == 1, timeout=20, what="the delivery to the worker")
    assert not farm.direct.hexists(RUNNING_TASKS, handle.task_id), "the job must not have started"
    first.kill(signal.SIGKILL)
    farm.redis_proxy.release()
    farm.start_workers("late")

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.worker.startswith("late@")
    assert_complete(farm, handle.task_id, manifest)
    wait_until(farm.queue_is_empty, timeout=20, what="an empty queue")


def test_killed_mid_upload_no_partial_result_is_succeeded_and_the_job_is_redone(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("up-a", "up-b", torch_threads="1")
    assert farm.s3_proxy is not None
    stopped = farm.s3_proxy.hold_at(b"/image-1.png ")  # images go up one by one, the manifest last
    handle = farm.client.submit(job(2, num_images=2, callbacks=[{"type": "frames", "every": 20}]))
    # The upload of the second image waits in the proxy, unseen by S3: the worker stays mid-upload, with the
    # first image stored and no manifest, however long this test takes to act.
    wait_until(stopped.is_set, timeout=120, what="the upload of the second image")
    assert "image-0.png" in farm.objects(handle.task_id)
    victim = holder(farm, handle.task_id)
    assert "manifest.json" not in farm.objects(handle.task_id)
    victim.kill(signal.SIGKILL)
    farm.s3_proxy.release()
    assert handle.status().state != "succeeded"

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2
    assert not manifest.worker.startswith(victim.hostname + ":")
    assert_complete(farm, handle.task_id, manifest)
    wait_until(farm.queue_is_empty, timeout=20, what="an empty queue")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a guard against a hang only: the waits below fail when the jobs stop moving
def test_random_kills_during_a_batch_lose_nothing_and_never_show_a_partial_success(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("rk-a", "rk-b", torch_threads="1")
    frames = [{"type": "frames", "every": 10}]
    specs = [job(100 + i, num_inference_steps=60, num_images=1 + i % 2, callbacks=frames) for i in range(20)]
    handles = farm.client.submit_many(specs)
    ids = [h.task_id for h in handles]

    premature: list[str] = []
    watching = threading.Event()
    watching.set()

    def watch() -> None:  # whenever a job looks succeeded, all its images must already be stored
        while watching.is_set():
            for task_id in ids:
                current = farm.client.status(task_id)
                if current.state == "succeeded" and current.manifest is not None:
                    stored = farm.objects(task_id)
                    wanted = [f"image-{i}.png" for i in range(current.manifest.spec["num_images"])]
                    if not set(wanted) <= set(stored):
                        premature.append(task_id)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rng = random.Random(7)
    kills = 0
    try:
        while kills < 3 and not all(farm.client.status(t).done for t in ids):
            time.sleep(rng.uniform(0.3, 2.0))
            victim = rng.choice([w for w in farm.workers if w.process and w.process.poll() is None])
            victim.kill(signal.SIGKILL)
            victim.stop()
            kills += 1
            farm.start_workers(f"{victim.name}-{kills}", ready=False, torch_threads="1")
        manifests = farm.finish(handles)
    finally:
        watching.clear()
        watcher.join(timeout=10)

    assert kills == 3
    assert premature == []
    assert [m.status for m in manifests] == ["succeeded"] * len(handles)
    for handle, manifest in zip(handles, manifests, strict=True):
        assert_complete(farm, handle.task_id, manifest)
    assert any(m.attempt > 1 for m in manifests), "no kill landed mid-job"
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")


def test_killed_mid_batch_every_job_of_the_batch_completes_once_on_a_fresh_worker(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    (first,) = farm.start_workers("mb-a", torch_threads="1", max_batch="4", prefetch="1")
    blocker = farm.client.submit(job(300, num_inference_steps=150, width=256, height=256))
    wait_until(progressed(farm, blocker.task_id, 1), timeout=120, what="the blocker on the GPU")
    handles = farm.client.submit_many([job(310 + i, num_inference_steps=120) for i in range(4)])
    ids = {h.task_id for h in handles}
    wait_until(
        lambda: ids <= running(farm.direct),
        timeout=120,
        what="the four jobs in the worker's hands",
    )
    blocker.revoke()
    wait_until(progressed(farm, handles[3].task_id, 5), timeout=120, what="the batch past step 5")
    first.kill(signal.SIGKILL)
    farm.start_workers("mb-b", torch_threads="1", max_batch="4", prefetch="1")

    manifests = farm.finish(handles)
    assert [m.status for m in manifests] == ["succeeded"] * 4
    assert all(m.attempt == 2 and m.worker.startswith("mb-b@") for m in manifests), "each redone once, elsewhere"
    for handle, manifest in zip(handles, manifests, strict=True):
        assert_complete(farm, handle.task_id, manifest)
    wait_until(farm.queue_is_empty, timeout=30, what="an empty queue")
