"""torch.compile per model (opt-in, `compile` in RENDER_MODELS): the compiled model renders what the plain one does,
its compile and warm-up happen at load and are timed, and inductor writes its cache where the fleet shares it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from producer import RenderSpec
from producer.records import WorkerInfo
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models.registry import ModelRegistry
from worker.settings import ModelSource
from worker.storage import LocalStorage

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    # inductor's own imports warn (torch 2.13); a worker logs them, this suite would turn them into errors
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def pixels(storage: LocalStorage, url: str) -> np.ndarray:
    data = storage.get(storage.name_of(url) or url)
    assert data is not None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_regionally_compiled_flux_renders_the_plain_image_and_times_its_compile_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    plain = ModelRegistry(
        {"m": ModelSource(family="flux", source="tiny")}, device=torch.device("cpu"), dtype=torch.float32
    )
    compiled = ModelRegistry(
        {"m": ModelSource(family="flux", source="tiny", compile="regional", warmup_size=64)},
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    spec = RenderSpec.parse(
        {"model": "m", "prompt": "a lighthouse", "num_inference_steps": 4, "width": 64, "height": 64, "seed": 2}
    )
    storage = LocalStorage(tmp_path / "out")
    want = render(JobContext(spec), registry=plain, storage=storage)
    compiled.pipeline("m")
    assert compiled.compile_seconds["m"] > 0 and "m" not in plain.compile_seconds
    got = render(JobContext(spec), registry=compiled, storage=storage)
    assert got.status == "succeeded"
    assert int(np.abs(pixels(storage, got.images[0]) - pixels(storage, want.images[0])).max()) <= 1
    assert any((tmp_path / "inductor").rglob("*")), "inductor wrote no cache to the shared directory"
    advert = WorkerInfo.load_fields(compiled.loaded_models(), compiled.loads, compiled.compile_seconds)
    assert WorkerInfo.from_hash(advert).compiled == {"m": compiled.compile_seconds["m"]}
    torch._dynamo.reset()
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
