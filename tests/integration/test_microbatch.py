"""Micro-batching through a real worker: compatible jobs in hand share UNet calls and still end on their own."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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
from worker.engine.batching import denoise_batch
from worker.engine.job import JobContext
from worker.engine.rendering import prepare, render
from worker.models.registry import ModelRegistry
from worker.settings import default_models
from worker.storage import LocalStorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATCHED = spec(num_inference_steps=120, width=96, height=96)
LORA_EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "lora-sd15.json").read_text())


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread in this process, like the worker's (`RENDER_TORCH_THREADS=1`), for the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def alone(specs: Sequence[dict[str, Any]], tmp_path: Any) -> list[list[np.ndarray]]:
    """The same specs rendered one by one in this process, with one torch thread like the worker."""
    registry = ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32)
    storage = LocalStorage(tmp_path)
    with one_thread():
        manifests = [
            render(JobContext(RenderSpec.parse(s), f"alone-{i}"), registry=registry, storage=storage)
            for i, s in enumerate(specs)
        ]
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


def test_four_copies_of_the_lora_example_with_clip_skip_share_one_call_and_each_gives_its_image(
    batching_farm: Farm, tmp_path: Any
) -> None:
    """examples/lora-sd15.json (clip skip 1, a LoRA, a negative prompt, a CFG cutoff, frames) with four seeds.

    Each image is compared with the same four rendered in one call in this process. Against its lone render a float32
    row differs by rounding only, but the tiny LoRA (random, 4x strength) amplifies that to tens of levels (without
    it, <= 1; in float64, 0): tests/unit/test_batching.py checks batched rows against lone renders in float64."""
    farm = batching_farm
    specs = [LORA_EXAMPLE | {"seed": 42 + i} for i in range(4)]
    manifests = farm.finish(behind_a_blocker(farm, specs))

    ids = [m.task_id for m in manifests]
    assert [m.status for m in manifests] == ["succeeded"] * 4, [m.error for m in manifests]
    for manifest in manifests:
        assert sorted(manifest.batched_with) == sorted(i for i in ids if i != manifest.task_id)
        assert manifest.clip_skip == 1 and [lora.name for lora in manifest.loras] == ["tiny-lora"]
    registry = ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32)
    storage = LocalStorage(tmp_path)
    with one_thread():
        prepared = [
            prepare(JobContext(RenderSpec.parse(s), f"here-{i}"), registry, storage) for i, s in enumerate(specs)
        ]
        together = denoise_batch(prepared, registry)
    for manifest, want in zip(manifests, together, strict=True):
        assert want.batched_with, "the jobs in this process shared one call too"
        got = [image(farm, url) for url in manifest.images]
        wanted = [np.asarray(each, dtype=np.int16) for each in want.images]
        assert max(int(np.abs(a - b).max()) for a, b in zip(got, wanted, strict=True)) <= 1
