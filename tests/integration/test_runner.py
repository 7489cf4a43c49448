"""The job runner with no broker: `JobRunner.run` takes a job from its message to its final state on real services
(a private redis-server, file storage, a tiny pipeline on the GPU thread), and tells the queue side what happened
through its `Delivery`, which here records the calls that a worker's Celery task turns into states and messages."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from localfarm.cluster import RedisServer
from producer.errors import ModelLoadError
from producer.keys import RUNNING_TASKS, lease_key, manifest_key, revoked_key
from producer.manifest import Manifest
from producer.records import Revocation, TaskMessage
from producer.spec import RenderSpec
from worker.models import tiny_sd15
from worker.process.runner import JobRunner
from worker.process.services import Services
from worker.settings import ModelSource, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class RecordedDelivery:
    """A `Delivery` that keeps what the runner told it."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def started(self) -> None:
        self.calls.append(("started", None))

    def progress(self, step: int, total: int, frame: str | None = None) -> None:
        self.calls.append(("progress", (step, total)))

    def requeue(self, message: TaskMessage) -> None:
        self.calls.append(("requeue", message))

    def withdraw(self, model: str, queue: str) -> None:
        self.calls.append(("withdraw", (model, queue)))

    def revoked(self, reason: str) -> None:
        self.calls.append(("revoked", reason))

    def named(self, name: str) -> list[Any]:
        return [value for called, value in self.calls if called == name]


@pytest.fixture(scope="module")
def runner(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    root = tmp_path_factory.mktemp("runner")
    broken = root / "broken"
    tiny_sd15.build().save_pretrained(broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model.*"):
        weights.write_bytes(b"not a tensor file" * 64)
    settings = WorkerSettings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/63",
        storage_url=f"file://{root / 'out'}",
        models={
            "tiny-sd15": ModelSource(family="sd15", source="tiny"),
            "broken": ModelSource(family="sd15", source=str(broken)),
        },
        progress_interval=0.0,
        max_attempts=2,
    )
    services = Services.start(settings, hostname="runner@test", deliveries=None)
    services.redis.flushdb()
    try:
        yield JobRunner(services)
    finally:
        services.close()
        shutil.rmtree(root, ignore_errors=True)


def job(task_id: str, **overrides: Any) -> tuple[RenderSpec, TaskMessage]:
    spec = RenderSpec.parse(
        {
            "model": "tiny-sd15",
            "prompt": "a lighthouse",
            "num_inference_steps": 4,
            "width": 64,
            "height": 64,
            **overrides,
        }
    )
    message = TaskMessage(task_id, spec.model_dump_json(), queue="render.tiny-sd15", priority=None, submitted_at=None)
    return spec, message


def test_a_job_runs_to_its_manifest_and_reports_its_start_and_every_step(runner: JobRunner) -> None:
    spec, message = job("runner-ok")
    delivery = RecordedDelivery()
    result = runner.run(spec, message, delivery)
    assert result is not None
    manifest = Manifest.model_validate(result)
    assert manifest.status == "succeeded" and manifest.steps_completed == 4
    assert delivery.named("started") == [None]
    assert delivery.named("progress")[-1] == (4, 4)
    assert not delivery.named("requeue") and not delivery.named("revoked")
    stored = runner.services.redis.get(manifest_key("runner-ok"))
    assert stored is not None and Manifest.model_validate_json(stored).status == "succeeded"
    assert not runner.services.redis.hexists(RUNNING_TASKS, "runner-ok"), "the lease was not released"
    storage = runner.services.storage
    assert len(manifest.images) == 1
    assert all(storage.get(storage.name_of(url) or url) for url in manifest.images), "the image was not stored"

    again = RecordedDelivery()
    assert runner.run(spec, message, again) == result, "a redelivery of a finished job returns its manifest"
    assert again.calls == []


def test_a_job_revoked_while_queued_leaves_no_result_and_tells_the_queue_it_is_revoked(runner: JobRunner) -> None:
    spec, message = job("runner-revoked")
    runner.services.redis.set(revoked_key("runner-revoked"), Revocation(at=1.0).value())
    delivery = RecordedDelivery()
    assert runner.run(spec, message, delivery) is None
    assert delivery.named("revoked") == ["revoked after 0 of 4 steps"]
    assert delivery.named("started") == [], "a revoked job never reaches the GPU"
    stored = runner.services.redis.get(manifest_key("runner-revoked"))
    assert stored is not None and Manifest.model_validate_json(stored).status == "revoked"


def test_a_job_leased_by_another_worker_is_dropped_untouched(runner: JobRunner) -> None:
    spec, message = job("runner-held")
    runner.services.redis.set(lease_key("runner-held"), "other@host:1:token", ex=60)
    delivery = RecordedDelivery()
    assert runner.run(spec, message, delivery) is None
    assert delivery.calls == []
    assert runner.services.redis.get(manifest_key("runner-held")) is None
    assert runner.services.redis.get(lease_key("runner-held")) == b"other@host:1:token"


def test_a_model_that_fails_to_load_is_withdrawn_and_its_job_handed_on_until_the_last_attempt(
    runner: JobRunner,
) -> None:
    spec, message = job("runner-broken", model="broken")
    first = RecordedDelivery()
    assert runner.run(spec, message, first) is None
    assert first.named("withdraw") == [("broken", "render.broken")]
    (requeued,) = first.named("requeue")
    assert (requeued.task_id, requeued.attempt, requeued.load_failures) == ("runner-broken", 2, 1)
    assert runner.services.withdrawn.keys() == {"broken"}

    last = RecordedDelivery()  # its second attempt, here again: RENDER_MAX_ATTEMPTS is 2, so it fails with the cause
    with pytest.raises(ModelLoadError, match="on 2 attempts; RENDER_MAX_ATTEMPTS is 2"):
        runner.run(spec, requeued, last)
    assert last.named("requeue") == [] and last.named("withdraw") == [], "withdrawn once, not again"
    assert runner.services.redis.get(lease_key("runner-broken")) is None
