"""What the model-family tests share: a revoking step hook, pixel comparisons, a job rendered alone."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from producer import RenderSpec
from worker.engine.job import JobContext
from worker.engine.rendering import Denoised, denoise, prepare
from worker.engine.stops import JobRevoked
from worker.hooks import StepInfo
from worker.models.registry import ModelRegistry
from worker.storage import LocalStorage


class RevokeAt:
    """A step hook that revokes the job once `step` steps are done; `calls` counts the steps it saw."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.calls = 0

    def on_step(self, info: StepInfo) -> None:
        self.calls += 1
        if info.steps_completed >= self.step:
            raise JobRevoked(info.steps_completed)


def pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def max_diff(a: list[Image.Image], b: list[Image.Image]) -> int:
    """The largest difference of one channel of one pixel between two lists of images, in levels."""
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(pixels(a), pixels(b), strict=True))


def stored_pixels(storage: LocalStorage, url: str) -> np.ndarray:
    data = storage.get(storage.name_of(url) or url)
    assert data is not None, url
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def alone(registry: ModelRegistry, storage: LocalStorage, spec: RenderSpec, task_id: str) -> Denoised:
    """The job's GPU phase on its own (no shared call)."""
    return denoise(prepare(JobContext(spec, task_id), registry, storage), registry)
