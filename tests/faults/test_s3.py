"""S3 slow or unavailable during upload: retried with backoff, then a clear failed state; never a false success."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from tests.faults.conftest import ChaosFarm, assert_complete, job, progressed

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

LONG = {"num_inference_steps": 150, "width": 256, "height": 256}


def mid_upload(farm: ChaosFarm, task_id: str) -> None:
    """Return once the job's upload is waiting on S3: answers are held from its first step on (a render writes
    nothing to S3 between its start and its upload), so a fast render cannot finish before the outage begins."""
    assert farm.s3_proxy is not None
    wait_until(progressed(farm, task_id, 1), timeout=90, what="the first step")
    farm.s3_proxy.hold()
    wait_until(lambda: farm.s3_proxy is not None and farm.s3_proxy.held > 0, timeout=90, what="the upload")
    assert not farm.client.status(task_id).done


def test_slow_s3_makes_uploads_slow_not_failed(chaos_farm: Callable[..., ChaosFarm]) -> None:
    farm = chaos_farm()
    farm.start_workers("slow-s3", torch_threads="1")
    assert farm.s3_proxy is not None
    farm.s3_proxy.delay = 0.25  # each S3 answer a quarter second late
    handle = farm.client.submit(job(500, num_images=2, callbacks=[{"type": "frames", "every": 10}]))
    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and len(manifest.frames) == 4
    assert manifest.timings.upload is not None and manifest.timings.upload >= 0.5  # two images, each ≥ 0.25 s
    assert_complete(farm, handle.task_id, manifest)


def test_an_s3_outage_during_upload_is_ridden_out_with_backoff(chaos_farm: Callable[..., ChaosFarm]) -> None:
    farm = chaos_farm()
    farm.start_workers("s3-blip", torch_threads="1", storage_retry_seconds="30")
    assert farm.s3_proxy is not None
    handle = farm.client.submit(job(501, num_images=2, **LONG))
    mid_upload(farm, handle.task_id)
    with farm.s3_proxy.outage(4.0):
        wait_until(lambda: "storage unavailable (attempt 2" in farm.log_text(), timeout=30, what="a second attempt")
        assert not handle.status().done

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 1
    assert manifest.timings.upload is not None and manifest.timings.upload >= 2.0, "the upload waited out the outage"
    assert_complete(farm, handle.task_id, manifest)


def test_an_s3_outage_past_the_retry_budget_fails_clearly_and_never_says_succeeded(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("s3-down", torch_threads="1", storage_retry_seconds="3")
    assert farm.s3_proxy is not None
    handle = farm.client.submit(job(502, **LONG))
    mid_upload(farm, handle.task_id)
    farm.s3_proxy.down()
    started = time.monotonic()
    final = list(farm.client.follow(handle.task_id, interval=0.1, timeout=120))[-1]
    gave_up_after = time.monotonic() - started
    farm.s3_proxy.up()

    assert final.state == "failed", final
    assert final.error is not None and "the S3 endpoint cannot be reached" in final.error
    assert "gave up after" in final.error and f"s3://{farm.bucket}/renders/{handle.task_id}/" in final.error
    assert gave_up_after < 60, f"failing took {gave_up_after:.0f} s with a 3 s retry budget"
    stored = farm.stored_manifest(handle.task_id)
    assert stored is None or stored["status"] == "failed"
    assert farm.client.status(handle.task_id).state == "failed"

    after = farm.client.submit(job(503, num_inference_steps=4))  # S3 is back: the worker serves again
    assert farm.finish([after])[0].status == "succeeded"
