"""The transformer families on a worker SIGKILLed mid-job: the job resumes on a fresh worker from its last checkpoint
and makes the pixels an uninterrupted run makes (tests/faults/test_resume.py checks the same for tiny-sd15). Half
the families here, half in test_resume_newer_families.py, so `make test`'s two processes take one file each."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from tests.faults.conftest import ChaosFarm, assert_complete, holder, job
from tests.faults.test_resume import stored_checkpoint_step
from tests.helpers import pixels
from worker.storage import open_storage

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

# Sizes where a step takes tens of ms on one core: 120 steps last seconds, and a checkpoint every half second
# stores several before the end.
SIZE = {
    "tiny-flux": 512,
    "tiny-sd3": 384,
    "tiny-qwen-image": 512,
    "tiny-chroma": 384,
    "tiny-flux2": 384,
    "tiny-z-image": 384,
}


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3", "tiny-qwen-image"])
def test_a_job_killed_after_a_checkpoint_resumes_elsewhere_with_the_uninterrupted_pixels(
    chaos_farm: Callable[..., ChaosFarm], model: str
) -> None:
    killed_and_resumed(chaos_farm(), model)


def killed_and_resumed(farm: ChaosFarm, model: str) -> None:
    """A job of `model` checkpointing every half second, SIGKILLed past step 10, resumes on another worker to the
    pixels of an uninterrupted run."""
    served = json.dumps({model: {"family": model.removeprefix("tiny-"), "source": "tiny"}})
    farm.start_workers("resume-a", models=served, checkpoint_seconds="0.5")
    spec = job(91, model=model, num_inference_steps=120, width=SIZE[model], height=SIZE[model])
    handle = farm.client.submit(spec)
    # Killed once a checkpoint past step 10 is stored, whatever this machine's speed.
    wait_until(
        lambda: (stored_checkpoint_step(farm, handle.task_id) or 0) > 10 or handle.status().state == "succeeded",
        timeout=240,
        what="a checkpoint past step 10",
        interval=0.05,
    )
    checkpointed = stored_checkpoint_step(farm, handle.task_id)
    assert handle.status().state != "succeeded", "the job ended before a checkpoint past step 10 was seen"
    holder(farm, handle.task_id).kill(signal.SIGKILL)
    farm.start_workers("resume-b", models=served, checkpoint_seconds="0.5")

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2 and manifest.worker.startswith("resume-b@")
    assert manifest.family == model.removeprefix("tiny-") and manifest.steps_completed == 120
    assert checkpointed is not None and manifest.resumed_from_step is not None
    assert manifest.resumed_from_step >= checkpointed > 10, "resumed from the last checkpoint, not from step 0"
    assert stored_checkpoint_step(farm, handle.task_id) is None, "the final state deleted the checkpoint"
    assert_complete(farm, handle.task_id, manifest)

    (whole,) = farm.finish([farm.client.submit(spec)])  # the same spec uninterrupted, on the same kind of worker
    assert whole.status == "succeeded" and whole.resumed_from_step is None and whole.seed == manifest.seed
    storage = open_storage(f"s3://{farm.bucket}/renders", s3_endpoint_url=farm.s3_endpoint)
    assert pixels(storage, manifest.images[0]) == pixels(storage, whole.images[0]), "the resumed image differs"
