"""The distributed path with real parts: redis-server, the S3 API server, `render worker` processes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer import RenderSpec, SpecError
from producer.keys import TASK_RENDER, job_key, model_queue
from tests.integration.conftest import LONG, Farm, spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).parents[2]


def test_a_batch_spreads_over_two_workers_and_every_job_succeeds(farm: Farm) -> None:
    specs = [spec(num_inference_steps=40, width=128, height=128, seed=i, num_images=1 + i % 2) for i in range(8)]
    handles = farm.client.submit_many(specs)
    manifests = [h.wait(timeout=120) for h in handles]
    assert [m.status for m in manifests] == ["succeeded"] * 8
    assert len({m.worker for m in manifests}) == 2, "both worker processes took jobs"
    for handle, manifest in zip(handles, manifests, strict=True):
        expected = [f"image-{i}.png" for i in range(manifest.spec["num_images"])] + ["manifest.json"]
        assert farm.objects(handle.task_id) == expected
        assert manifest.images == [f"s3://{farm.bucket}/renders/{handle.task_id}/{n}" for n in expected[:-1]]
        assert manifest.timings.queue_wait is not None and manifest.timings.queue_wait >= 0
        assert farm.client.status(handle.task_id).state == "succeeded"


def test_a_running_job_revoked_stops_within_one_step_without_decode_or_upload(farm: Farm) -> None:
    # 512²: steps of tens of ms. The revoke is pushed to the worker's revocation thread; beside a CPU-bound
    # process on two cores that thread took 14 ms to be scheduled, two of LONG's 7 ms steps (the step reads a
    # flag, so the stop comes at the end of the step in flight once the notice is there).
    handle = farm.client.submit(LONG | {"width": 512, "height": 512, "callbacks": [{"type": "frames", "every": 50}]})
    wait_for(farm, handle.task_id, lambda s: s.state == "progress" and (s.step or 0) >= 3)
    assert handle.revoke() == "revoked"
    final = wait_for(farm, handle.task_id, lambda s: s.done)
    assert final.state == "revoked" and final.manifest is not None
    manifest = final.manifest
    assert manifest.status == "revoked" and 3 <= manifest.steps_completed < 150
    assert manifest.steps_after_revoke is not None and manifest.steps_after_revoke <= 1
    assert manifest.timings.revoke_to_stop is not None and manifest.timings.decode is None
    assert [name for name in farm.objects(handle.task_id) if name.startswith("image")] == []
    assert "manifest.json" in farm.objects(handle.task_id)
    assert handle.revoke() == "already-finished"


def keda_demand(farm: Farm, model: str) -> tuple[int, bool]:
    """What the KEDA example's ScaledObject asks for on this farm's Redis, with its model's lists renamed for
    `model`: HPA's replica count (the largest ceil(length / listLength)) and KEDA's activation (a list non-empty)."""
    documents = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text()))
    scaled = next(d for d in documents if d["kind"] == "ScaledObject")
    lengths = []
    for trigger in scaled["spec"]["triggers"]:
        name = trigger["metadata"]["listName"].replace("render.sd15", model_queue("render", model))
        lengths.append((farm.redis.llen(name), int(trigger["metadata"]["listLength"])))
    return max(-(-length // target) for length, target in lengths), any(length > 0 for length, _ in lengths)


def test_the_kubernetes_autoscaler_example_counts_a_running_job(farm: Farm) -> None:
    running = farm.client.submit(LONG)
    wait_for(farm, running.task_id, lambda s: s.state == "progress")
    assert farm.redis.llen(model_queue("render", "tiny-sd15")) == 0, "the job is off its queue: only running"
    assert keda_demand(farm, "tiny-sd15") == (1, True), "zero replicas must be impossible while a job runs"
    running.revoke()
    running.wait(timeout=60)
    assert keda_demand(farm, "tiny-sd15") == (0, False), "and once it ended, nothing is counted"


def test_a_queued_job_revoked_never_starts(farm: Farm) -> None:
    blockers = farm.client.submit_many([LONG, LONG])
    for blocker in blockers:
        wait_for(farm, blocker.task_id, lambda s: s.state in ("started", "progress"))
    queued = farm.client.submit(spec())
    assert queued.status().state == "queued"
    assert queued.revoke() == "revoked"
    for blocker in blockers:
        blocker.revoke()
    final = wait_for(farm, queued.task_id, lambda s: s.done)
    assert final.state == "revoked"
    assert final.step in (None, 0)
    assert [name for name in farm.objects(queued.task_id) if name != "manifest.json"] == []


def test_the_step_budget_keeps_the_partial_image(farm: Farm) -> None:
    handle = farm.client.submit(spec(callbacks=[{"type": "step_budget", "max_steps": 3}]))
    manifest = handle.wait(timeout=60)
    assert (manifest.status, manifest.interrupted_by, manifest.steps_completed) == ("interrupted", "max_steps", 3)
    assert farm.objects(handle.task_id) == ["image-0.png", "manifest.json"]
    assert handle.status().state == "interrupted"


def test_a_bad_spec_is_refused_by_the_producer_and_nothing_is_enqueued(farm: Farm) -> None:
    with pytest.raises(SpecError, match=r"specs\[1\]: invalid render spec: width: must be a multiple of 8"):
        farm.client.submit_many([spec(), spec(width=100)], task_ids=["good-one", "bad-one"])
    assert not farm.redis.exists(job_key("good-one")) and not farm.redis.exists(job_key("bad-one"))
    assert farm.client.status("good-one").state == "unknown"


def test_malformed_messages_fail_cleanly_and_the_worker_keeps_serving(farm: Farm) -> None:
    missing_prompt = farm.client.app.send_task(TASK_RENDER, args=[json.dumps({"model": "tiny-sd15"})])
    not_a_spec = farm.client.app.send_task(TASK_RENDER, args=[12345])
    pickled = farm.client.app.send_task(TASK_RENDER, args=["x"], serializer="pickle")
    failed = wait_for(farm, missing_prompt.id, lambda s: s.done)
    assert failed.state == "failed" and "prompt" in (failed.error or "")
    assert wait_for(farm, not_a_spec.id, lambda s: s.done).state == "failed"
    after = farm.client.submit(spec())
    assert after.wait(timeout=60).status == "succeeded"
    assert farm.client.status(pickled.id).state in ("unknown", "queued"), "a pickled message is never executed"
    assert all(w.process is not None and w.process.poll() is None for w in farm.workers)


def test_unknown_task_status_and_revoke_are_clear_no_ops(farm: Farm) -> None:
    assert farm.client.status("no-such-task").state == "unknown"
    assert farm.client.revoke("no-such-task") == "unknown"


def test_progress_reaches_the_event_stream_flower_reads(farm: Farm) -> None:
    events: list[dict[str, Any]] = []
    app = farm.client.app
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not events and time.monotonic() < deadline:  # the workers' heartbeats show the receiver is bound
            time.sleep(0.05)
        assert events, "no event reached the receiver"
        handle = farm.client.submit(spec(num_inference_steps=40, width=128, height=128))
        handle.wait(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e["type"] == "task-succeeded" and e.get("uuid") == handle.task_id for e in events
        ):
            time.sleep(0.05)
        receiver.should_stop = True
        thread.join(timeout=10)
    mine = [e for e in events if e.get("uuid") == handle.task_id]
    kinds = [e["type"] for e in mine]
    assert {"task-sent", "task-received", "task-started", "task-progress", "task-succeeded"} <= set(kinds)
    progress = [(e["step"], e["total"]) for e in mine if e["type"] == "task-progress"]
    assert progress[-1] == (40, 40) and all(total == 40 for _, total in progress)
    assert [s for s, _ in progress] == sorted(s for s, _ in progress)


@pytest.mark.parametrize(
    "example", ["img2img-sd15.json", "inpaint-sdxl.json", "controlnet-sd15.json", "ip-adapter-sdxl.json"]
)
def test_every_pipeline_through_the_worker(farm: Farm, example: str) -> None:
    data = json.loads((Path(__file__).parents[2] / "examples" / example).read_text())
    manifest = farm.client.submit(data).wait(timeout=120)
    assert manifest.status == "succeeded" and manifest.steps_completed == RenderSpec.parse(data).denoising_steps
    assert len(manifest.images) == data.get("num_images", 1)


def test_following_a_job_wakes_on_each_published_change_not_on_its_poll_interval(farm: Farm) -> None:
    handle = farm.client.submit(spec(num_inference_steps=20))
    seen: list[str] = []
    follower = threading.Thread(
        target=lambda: seen.extend(s.state for s in farm.client.follow(handle.task_id, interval=600)), daemon=True
    )
    follower.start()
    follower.join(timeout=300)  # the job takes seconds; polling every 600 s could not have finished
    assert not follower.is_alive(), "follow() was never woken by the result backend's publish"
    assert seen[-1] == "succeeded"
    assert farm.redis.pubsub_numsub(farm.client.app.backend.get_key_for_task(handle.task_id))[0][1] == 0
