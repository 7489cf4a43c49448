"""The CUDA path: float16 pipelines and frames copied through pinned memory without a device sync."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from producer import RenderSpec
from worker.engine.rendering import render
from worker.models.registry import ModelRegistry
from worker.settings import default_models
from worker.storage import LocalStorage

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_fp16_render_with_frames_every_step(tmp_path: Path, model: str) -> None:
    registry = ModelRegistry(default_models(), device=torch.device("cuda"), dtype=torch.float16)
    storage = LocalStorage(tmp_path)
    spec = RenderSpec.parse(
        {
            "model": model,
            "prompt": "a fox",
            "num_inference_steps": 8,
            "width": 64,
            "height": 64,
            "seed": 1,
            "num_images": 2,
            "callbacks": [{"type": "cfg_cutoff", "step_ratio": 0.5}, {"type": "frames", "every": 1, "size": 32}],
        }
    )
    manifest = render(spec, registry=registry, storage=storage)
    assert manifest.status == "succeeded" and len(manifest.images) == 2 and len(manifest.frames) == 8
    last = storage.get(manifest.frames[-1].removeprefix(storage.base_url + "/"))
    assert last is not None and Image.open(io.BytesIO(last)).size == (64, 32)
