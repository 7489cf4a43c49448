"""Micro-batching through a real worker: compatible jobs in hand share UNet calls and still end on their own."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.client import JobHandle
from tests.helpers import running, wait_until
from tests.integration.conftest import LONG, Farm, spec, wait_for
from worker.job import JobContext
from worker.models.registry import ModelRegistry
from worker.rendering import render
from worker.settings import default_models
from worker.storage import LocalStorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATCHED = spec(num_inference_steps=120, width=96, height=96)


@pytest.fixture(scope="module")
def batching_farm(farm_factory: Callable[[], Farm]) -> Farm:
    made = farm_factory()
    made.start_workers("batcher", max_batch="4", prefetch="2")
    return made


def behind_a_blocker(farm: Farm, specs: Sequence[dict[str, Any]]) -> list[JobHandle]:
    """Submit `specs` while a long job holds the GPU, and free it once every one is in the worker's hands."""
    blocker = farm.client.submit(LONG)
    wait_for(farm, blocker.task_id, lambda s: s.state == "progress")
    handles = farm.client.submit_many(list(specs))
    ids = {h.task_id for h in handles}
    wait_until(
        lambda: ids <= running(farm.redis),
        timeout=120,
        what="every job taken by the worker (its lease held) while the blocker runs",
    )
    assert all(h.status().state == "queued" for h in handles), "a job waiting for the GPU shows queued"
    blocker.revoke()
    return handles


def image(farm: Farm, url: str) -> np.ndarray:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    body = boto3.client("s3", endpoint_url=farm.s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16)


def alone(specs: Sequence[dict[str, Any]], tmp_path: Any) -> list[list[np.ndarray]]:
    """The same specs rendered one by one in this process, with one torch thread like the worker."""
    registry = ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32)
    storage = LocalStorage(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifests = [
            render(JobContext(RenderSpec.parse(s), f"alone-{i}"), registry=registry, storage=storage)
            for i, s in enumerate(specs)
        ]
    finally:
        torch.set_num_threads(threads)
    return [
        [np.asarray(Image.open(tmp_path / m.task_id / f"image-{i}.png"), dtype=np.int16) for i in range(len(m.images))]
        for m in manifests
    ]


def test_four_jobs_share_one_call_one_revoked_mid_run_the_rest_as_alone_and_another_size_alone(
    batching_farm: Farm, tmp_path: Any
) -> None:
    farm = batching_farm
    specs = [BATCHED | {"prompt": f"a lighthouse, take {i}", "seed": 10 + i, "num_images": 1} for i in range(4)]
    other = spec(width=64, height=64, seed=99)
    handles = behind_a_blocker(farm, [*specs, other])
    victim = handles[1]
    wait_for(farm, victim.task_id, lambda s: s.state == "progress" and (s.step or 0) >= 5, timeout=120)
    assert victim.revoke() == "revoked"
    manifests = farm.finish(handles)

    ids = [h.task_id for h in handles[:4]]
    assert [m.status for m in manifests] == ["succeeded", "revoked", "succeeded", "succeeded", "succeeded"]
    for i, manifest in enumerate(manifests[:4]):
        assert sorted(manifest.batched_with) == sorted(other_id for other_id in ids if other_id != ids[i])
    assert manifests[4].batched_with == [], "a job of another size is not batched"
    assert manifests[1].images == [] and 5 <= manifests[1].steps_completed < 120
    assert [n for n in farm.objects(ids[1]) if n.startswith("image")] == []
    expected = alone([specs[i] for i in (0, 2, 3)], tmp_path)
    for want, manifest in zip(expected, [manifests[0], manifests[2], manifests[3]], strict=True):
        got = [image(farm, url) for url in manifest.images]
        assert max(int(np.abs(a - b).max()) for a, b in zip(got, want, strict=True)) <= 1
        assert manifest.steps_completed == 120 and manifest.timings.denoise is not None


def test_a_budget_spent_inside_the_batch_leaves_it_interrupted_with_its_partial_image(batching_farm: Farm) -> None:
    farm = batching_farm
    budget = [{"type": "step_budget", "max_steps": 20}]
    specs = [spec(num_inference_steps=40, seed=30 + i, **({"callbacks": budget} if i == 2 else {})) for i in range(3)]
    manifests = farm.finish(behind_a_blocker(farm, specs))
    assert [m.status for m in manifests] == ["succeeded", "succeeded", "interrupted"]
    assert manifests[2].steps_completed == 20 and manifests[2].interrupted_by == "max_steps"
    assert len(manifests[2].images) == 1 and len(manifests[2].batched_with) == 2
    assert [m.steps_completed for m in manifests[:2]] == [40, 40]
