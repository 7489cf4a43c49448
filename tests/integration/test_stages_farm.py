"""A hires-fix job and a base + refiner job whose worker is SIGKILLed in the second stage resume on another
`render worker` process in that stage (the first is skipped) and make the image an uninterrupted run makes, byte for
byte, with the same frames."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.helpers import pixels, wait_until
from tests.helpers import stored_checkpoint as checkpoint_in
from tests.integration.conftest import Farm, spec
from worker.engine.checkpoints import Checkpoint
from worker.storage import open_storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BASE_STEPS = 8


def stored_checkpoint(farm: Farm, task_id: str) -> Checkpoint | None:
    """The job's checkpoint in the bucket, read straight from the S3 server."""
    found: Checkpoint | None = checkpoint_in(farm.s3_endpoint, farm.bucket, task_id)
    return found


# The second stage is long enough to be killed in, a checkpoint or more in: 120 hires steps on 256x256 (a 32x32
# latent); a refiner's 118 of 120 steps (switch at 0.05) on 192x192.
CASES = {
    "hires": (
        dict(
            num_inference_steps=BASE_STEPS,
            hires={"scale": 4, "strength": 1.0, "steps": 120, "upscaler": "latent"},
        ),
        [("base", BASE_STEPS), ("hires", 120)],
    ),
    "refiner": (
        dict(
            model="tiny-sdxl",
            num_inference_steps=120,
            width=192,
            height=192,
            refiner={"model": "tiny-sdxl-refiner", "switch_at": 0.05},
        ),
        [("base", 2), ("refiner", 118)],  # the split diffusers makes of 120 dpmpp_2m steps at 0.05
    ),
}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_worker_killed_in_the_second_stage_resumes_there_elsewhere_byte_for_byte(
    farm_factory: Callable[[], Farm], stage: str
) -> None:
    farm = farm_factory()
    (first,) = farm.start_workers(f"{stage}-a", checkpoint_seconds="0.3")
    overrides, stages = CASES[stage]
    (_, base_steps), (_, second_steps) = stages
    job = spec(seed=21, scheduler="dpmpp_2m", callbacks=[{"type": "frames", "every": 8}], **overrides)
    handle = farm.client.submit(job)

    def in_second_stage() -> bool:
        checkpoint = stored_checkpoint(farm, handle.task_id)
        return handle.status().state == "succeeded" or (
            checkpoint is not None and checkpoint.stage == 1 and checkpoint.step > base_steps + 2
        )

    wait_until(in_second_stage, timeout=180, what=f"a checkpoint in the {stage} stage", interval=0.05)
    assert handle.status().state != "succeeded", f"the job ended before a checkpoint in its {stage} stage was seen"
    checkpoint = stored_checkpoint(farm, handle.task_id)
    assert checkpoint is not None
    first.kill(signal.SIGKILL)
    farm.start_workers(f"{stage}-b", checkpoint_seconds="0.3")

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2 and manifest.worker.startswith(f"{stage}-b@")
    assert manifest.resumed_from_step is not None and manifest.resumed_from_step >= checkpoint.step > base_steps
    assert [(s.name, s.steps_planned, s.steps_completed) for s in manifest.stages] == [
        (name, steps, steps) for name, steps in stages
    ]
    assert stored_checkpoint(farm, handle.task_id) is None, "the final state deleted the checkpoint"

    (whole,) = farm.finish([farm.client.submit(job)])  # the same spec uninterrupted, on the same kind of worker
    assert whole.resumed_from_step is None and whole.seed == manifest.seed
    storage = open_storage(f"s3://{farm.bucket}/renders", s3_endpoint_url=farm.s3_endpoint)
    assert pixels(storage, manifest.images[0]) == pixels(storage, whole.images[0]), "the resumed image differs"
    names = [url.rsplit("/", 1)[-1] for url in manifest.frames]
    assert names == [url.rsplit("/", 1)[-1] for url in whole.frames]
    first_frames = [f"step-{step:03d}.png" for step in range(8, base_steps + 1, 8)]
    assert names == [*first_frames, *(f"{stage}-step-{step:03d}.png" for step in range(8, second_steps + 1, 8))]
