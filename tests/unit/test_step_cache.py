"""Step caches per job (diffusers' `enable_cache`): on where the family's model has them, refused where not, and
gone after every job whatever its end, so the next job renders as on a fresh pipeline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.errors import UnsupportedSpecError
from producer.keys import checkpoint_object
from worker.engine.batching import shared_call_key
from worker.engine.drain import Drain
from worker.engine.job import JobContext
from worker.engine.rendering import denoise, prepare, render, store
from worker.engine.stops import HandedOff, JobRevoked
from worker.hooks import StepInfo
from worker.models.registry import ModelRegistry
from worker.settings import ModelSource, default_models
from worker.storage import LocalStorage

FIRST_BLOCK = {"type": "first_block", "threshold": 0.5}


def registry() -> ModelRegistry:
    models = {name: default_models()[name] for name in ("tiny-flux", "tiny-sd15", "tiny-sd3")}
    models |= {
        f"tiny-{family}": ModelSource(family=family, source="tiny") for family in ("qwen-image", "flux2", "chroma")
    }
    return ModelRegistry(models, device=torch.device("cpu"), dtype=torch.float32, max_cached=3)


def make_spec(model: str = "tiny-flux", **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a lighthouse", "num_inference_steps": 12, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 5, **overrides})


def pixels(storage: LocalStorage, url: str) -> np.ndarray:
    data = storage.get(storage.name_of(url) or url)
    assert data is not None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class RevokeAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            raise JobRevoked(info.steps_completed)


def block_calls(pipe: Any) -> list[int]:
    """A counter of the linear layers run inside the transformer's blocks: a cache that skips blocks, or predicts an
    attention's output, runs fewer (the blocks themselves are still called)."""
    calls: list[int] = []
    for name, module in pipe.transformer.named_modules():
        if "blocks." in name and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


TAYLORSEER = {"type": "taylorseer", "interval": 3, "warmup_steps": 2}
CACHED = [
    ("tiny-flux", FIRST_BLOCK),
    ("tiny-flux", TAYLORSEER),
    ("tiny-qwen-image", FIRST_BLOCK),
    ("tiny-qwen-image", TAYLORSEER),
    ("tiny-flux2", TAYLORSEER),
]


@pytest.mark.parametrize(("model", "cache"), CACHED)
def test_a_cached_job_skips_model_work_and_the_cache_is_gone_after_it(
    tmp_path: Path, model: str, cache: dict[str, Any]
) -> None:
    models = registry()
    storage = LocalStorage(tmp_path)
    calls = block_calls(models.pipeline(model))
    plain = render(JobContext(make_spec(model)), registry=models, storage=storage)
    uncached_calls = len(calls)
    cached = render(JobContext(make_spec(model, cache=cache)), registry=models, storage=storage)
    cached_calls = len(calls) - uncached_calls
    assert cached.status == "succeeded" and 0 < cached_calls < uncached_calls, (cached_calls, uncached_calls)
    assert not models.pipeline(model).transformer.is_cache_enabled, "the cache outlived its job"
    again = render(JobContext(make_spec(model)), registry=models, storage=storage)
    assert np.array_equal(pixels(storage, again.images[0]), pixels(storage, plain.images[0]))


def test_an_uncached_job_after_a_revoked_cached_one_renders_as_in_a_fresh_process(tmp_path: Path) -> None:
    fresh_storage = LocalStorage(tmp_path / "fresh")
    fresh = render(JobContext(make_spec()), registry=registry(), storage=fresh_storage)

    models = registry()
    storage = LocalStorage(tmp_path / "used")
    revoked = render(JobContext(make_spec(cache=FIRST_BLOCK), hooks=[RevokeAt(5)]), registry=models, storage=storage)
    assert revoked.status == "revoked"
    after = render(JobContext(make_spec()), registry=models, storage=storage)
    assert np.array_equal(pixels(storage, after.images[0]), pixels(fresh_storage, fresh.images[0]))


def test_a_cached_job_writes_no_checkpoint_and_a_draining_worker_hands_it_back_to_start_again(tmp_path: Path) -> None:
    models = registry()
    storage = LocalStorage(tmp_path)
    spec = make_spec(cache=FIRST_BLOCK)
    done = render(JobContext(spec, "cached", checkpoint_seconds=1e-9), registry=models, storage=storage)
    assert done.status == "succeeded" and storage.get(checkpoint_object("cached")) is None

    drain = Drain()
    drain.begin(0.0)  # every job leaves at its next step
    prepared = prepare(JobContext(spec, "drained", drain=drain), models, storage)
    outcome = denoise(prepared, models)
    assert isinstance(outcome.stop, HandedOff) and outcome.stop.steps_completed == 1
    with pytest.raises(HandedOff):
        store(prepared, outcome, storage)
    assert storage.get(checkpoint_object("drained")) is None, "a cached job left a checkpoint it cannot resume from"
    assert not models.pipeline("tiny-flux").transformer.is_cache_enabled


def test_cached_jobs_never_share_a_call() -> None:
    assert shared_call_key(make_spec(cache=FIRST_BLOCK)) is None
    assert shared_call_key(make_spec()) is not None


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd3", "tiny-chroma"])
def test_a_family_without_step_caches_refuses_one_naming_the_field(tmp_path: Path, model: str) -> None:
    with pytest.raises(UnsupportedSpecError, match=r"^cache.type: .* takes no 'first_block' step cache .* none\)"):
        prepare(JobContext(make_spec(model, cache=FIRST_BLOCK)), registry(), LocalStorage(tmp_path))
