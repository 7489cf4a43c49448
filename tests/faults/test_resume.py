"""A worker SIGKILLed mid-job: the job resumes on a fresh worker from its last checkpoint, not from step 0,
and makes the image an uninterrupted run makes."""

from __future__ import annotations

import signal
from collections.abc import Callable

import boto3
import pytest

from tests.faults.conftest import ChaosFarm, assert_complete, holder, job
from tests.helpers import pixels
from worker.checkpoints import decode
from worker.local_cluster import wait_until
from worker.storage import open_storage

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def stored_checkpoint_step(farm: ChaosFarm, task_id: str) -> int | None:
    """The step of the job's checkpoint in the bucket, read straight from the S3 server."""
    s3 = boto3.client("s3", endpoint_url=farm.s3_endpoint)
    try:
        body = s3.get_object(Bucket=farm.bucket, Key=f"renders/{task_id}/checkpoint.pt")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return decode(body).step


def test_a_150_step_job_killed_past_step_100_resumes_elsewhere_from_its_checkpoint_with_the_same_image(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("resume-a", checkpoint_seconds="1")
    # 512x512: ~50 ms a step on one core, so a checkpoint a second is ~20 steps and steps 100-150 take seconds.
    spec = job(77, num_inference_steps=150, width=512, height=512, scheduler="dpmpp_2m_sde_karras")
    handle = farm.client.submit(spec)
    # Killed once a checkpoint past step 100 is stored: whatever this machine's speed, the kill lands past it.
    wait_until(
        lambda: (stored_checkpoint_step(farm, handle.task_id) or 0) > 100 or handle.status().state == "succeeded",
        timeout=240,
        what="a checkpoint past step 100",
    )
    checkpointed = stored_checkpoint_step(farm, handle.task_id)
    assert handle.status().state != "succeeded", "the job ended before a checkpoint past step 100 was seen"
    holder(farm, handle.task_id).kill(signal.SIGKILL)
    farm.start_workers("resume-b", checkpoint_seconds="1")

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2 and manifest.worker.startswith("resume-b@")
    assert checkpointed is not None and manifest.resumed_from_step is not None
    assert manifest.resumed_from_step >= checkpointed > 100, "resumed from the last checkpoint, not from step 0"
    assert stored_checkpoint_step(farm, handle.task_id) is None, "the final state deleted the checkpoint"
    assert_complete(farm, handle.task_id, manifest)

    (whole,) = farm.finish([farm.client.submit(spec)])  # the same spec uninterrupted, on the same kind of worker
    assert whole.resumed_from_step is None and whole.seed == manifest.seed
    storage = open_storage(f"s3://{farm.bucket}/renders", s3_endpoint_url=farm.s3_endpoint)
    assert pixels(storage, manifest.images[0]) == pixels(storage, whole.images[0]), "the resumed image differs"
