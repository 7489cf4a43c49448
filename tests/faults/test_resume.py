"""A worker SIGKILLed mid-job: the job resumes on a fresh worker from its last checkpoint, not from step 0,
and makes the image an uninterrupted run makes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from localfarm.cluster import wait_until
from producer.keys import deaths_key
from tests.faults.conftest import ChaosFarm, assert_complete, holder, job, progressed
from tests.helpers import pixels, running, stored_checkpoint
from worker.storage import open_storage

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]


def stored_checkpoint_step(farm: ChaosFarm, task_id: str) -> int | None:
    """The step of the job's checkpoint in the bucket, read straight from the S3 server."""
    checkpoint = stored_checkpoint(farm.s3_endpoint, farm.bucket, task_id)
    return None if checkpoint is None else int(checkpoint.step)


def test_a_150_step_job_killed_past_step_100_resumes_elsewhere_from_its_checkpoint_with_the_same_image(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("resume-a", checkpoint_seconds="1")
    # 512x512: ~50 ms a step on one core, so a checkpoint a second is ~20 steps and steps 100-150 take seconds.
    spec = job(77, num_inference_steps=150, width=512, height=512, scheduler="dpmpp_2m_sde_karras")
    handle = farm.client.submit(spec)
    wait_until(progressed(farm, handle.task_id, 10), timeout=240, what="the job past step 10")
    early = (time.monotonic(), farm.client.status(handle.task_id).step or 0)
    # Killed once a checkpoint past step 100 is stored: whatever this machine's speed, the kill lands past it.
    wait_until(
        lambda: (stored_checkpoint_step(farm, handle.task_id) or 0) > 100 or handle.status().state == "succeeded",
        timeout=240,
        what="a checkpoint past step 100",
    )
    checkpointed = stored_checkpoint_step(farm, handle.task_id)
    assert handle.status().state != "succeeded", "the job ended before a checkpoint past step 100 was seen"
    holder(farm, handle.task_id).kill(signal.SIGKILL)
    killed = (time.monotonic(), farm.client.status(handle.task_id).step or 0)  # progress lags the steps a little
    farm.start_workers("resume-b", checkpoint_seconds="1")

    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 2 and manifest.worker.startswith("resume-b@")
    assert checkpointed is not None and manifest.resumed_from_step is not None
    assert manifest.resumed_from_step >= checkpointed > 100, "resumed from the last checkpoint, not from step 0"
    per_second = (killed[1] - early[1]) / (killed[0] - early[0])
    redone = killed[1] - manifest.resumed_from_step
    # At most one interval (1 s) of steps redone; a second more for the writer's latency and progress's lag.
    assert redone <= 2 * per_second + 2, f"{redone} steps redone at {per_second:.0f} steps/s"
    assert stored_checkpoint_step(farm, handle.task_id) is None, "the final state deleted the checkpoint"
    assert_complete(farm, handle.task_id, manifest)

    (whole,) = farm.finish([farm.client.submit(spec)])  # the same spec uninterrupted, on the same kind of worker
    assert whole.resumed_from_step is None and whole.seed == manifest.seed
    storage = open_storage(f"s3://{farm.bucket}/renders", s3_endpoint_url=farm.s3_endpoint)
    assert pixels(storage, manifest.images[0]) == pixels(storage, whole.images[0]), "the resumed image differs"


def test_sigterm_hands_back_a_long_job_and_a_waiting_one_the_worker_exits_in_seconds_and_both_go_on_elsewhere(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    # No drain time: the job on the GPU leaves at its next step, however fast this machine renders the rest.
    # Checkpoints at their default (30 s): none before the hand-off's own.
    (first,) = farm.start_workers("term-a", drain_seconds="0")
    spec = job(78, num_inference_steps=80, width=512, height=512, scheduler="euler_a")
    long = farm.client.submit(spec)
    wait_until(progressed(farm, long.task_id, 20), timeout=240, what="the long job past step 20")
    waiting = farm.client.submit(job(79, num_inference_steps=20))  # behind it: the worker holds it, waiting
    wait_until(lambda: waiting.task_id in running(farm.direct), timeout=60, what="the second job in the worker's hands")
    signalled = time.monotonic()
    first.kill(signal.SIGTERM)
    first.process.wait(timeout=60)
    assert time.monotonic() - signalled < 10, "the worker must exit in seconds, not at the job's end"
    assert first.process.returncode == 0
    assert {farm.client.status(h.task_id).state for h in (long, waiting)} == {"queued"}
    log = first.log_path.read_text(errors="replace")
    assert f"task {long.task_id} handed back to its queue" in log and f"task {waiting.task_id} handed back" in log

    farm.start_workers("term-b")
    manifest, second = farm.finish([long, waiting])
    assert manifest.status == second.status == "succeeded"
    assert manifest.attempt == 2 and manifest.worker.startswith("term-b@") and manifest.resumed_from_step
    assert manifest.resumed_from_step >= 20, "resumed from the hand-off's checkpoint"
    assert second.attempt == 2 and second.resumed_from_step is None, "the waiting job had not started"
    assert not farm.direct.exists(deaths_key(long.task_id), deaths_key(waiting.task_id)), "a hand-off is no death"
    assert_complete(farm, long.task_id, manifest)

    (whole,) = farm.finish([farm.client.submit(spec)])
    storage = open_storage(f"s3://{farm.bucket}/renders", s3_endpoint_url=farm.s3_endpoint)
    assert pixels(storage, manifest.images[0]) == pixels(storage, whole.images[0]), "the resumed image differs"


def test_sigterm_lets_a_job_that_ends_within_the_drain_time_finish_on_the_same_worker(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    (first,) = farm.start_workers("drain-a", drain_seconds="120")
    handle = farm.client.submit(job(80, num_inference_steps=60, width=512, height=512))
    wait_until(progressed(farm, handle.task_id, 5), timeout=240, what="the job past step 5")
    first.kill(signal.SIGTERM)
    first.process.wait(timeout=240)
    (manifest,) = farm.finish([handle])
    assert manifest.status == "succeeded" and manifest.attempt == 1 and manifest.worker.startswith("drain-a@")


def test_a_second_sigterm_ends_a_draining_worker_at_once(chaos_farm: Callable[..., ChaosFarm]) -> None:
    farm = chaos_farm()
    (first,) = farm.start_workers("twice-a", drain_seconds="600")  # the first SIGTERM lets the job finish
    handle = farm.client.submit(job(81, num_inference_steps=150, width=512, height=512))
    wait_until(progressed(farm, handle.task_id, 5), timeout=240, what="the job past step 5")
    first.kill(signal.SIGTERM)
    wait_until(lambda: "a second signal exits" in first.log_path.read_text(errors="replace"), timeout=60, what="drain")
    signalled = time.monotonic()
    first.kill(signal.SIGTERM)
    assert first.process is not None
    first.process.wait(timeout=60)
    assert time.monotonic() - signalled < 10 and first.process.returncode == 1
    assert handle.status().state != "succeeded", "the job was cut short: recovery moves it (test above)"
