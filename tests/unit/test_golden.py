"""SD 1.5 and SDXL render the same pixels as before the model-family layer: references rendered before it.

Each case renders on the tiny pipelines (CPU, float32) and compares every image and frame with the PNG stored in
tests/data/golden/: byte for byte on the CPU that wrote them, within float rounding on another (`same_render`).
The references were written by this module before the family layer moved the SD specifics
(`python -m tests.unit.test_golden --write`); rewrite them only for a change that means to change what SD 1.5 or
SDXL renders, and say so in its commit.
"""

from __future__ import annotations

import io
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from producer.spec import RenderSpec
from worker.engine.batching import denoise_batch
from worker.engine.job import JobContext
from worker.engine.rendering import prepare, render, store
from worker.models.registry import ModelRegistry
from worker.settings import default_loras, default_models
from worker.storage import LocalStorage

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def pattern(mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic 64x64 input image."""
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([(x * 4 + seed) % 256, (y * 4) % 256, ((x + y) * 2 + 3 * seed) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "L":
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:48, 20:44] = 255
        return Image.fromarray(mask, "L")
    return image


def spec(model: str = "tiny-sd15", **overrides: Any) -> RenderSpec:
    data = {"model": model, "prompt": "a lighthouse at dusk", "num_inference_steps": 6, "width": 64, "height": 64}
    return RenderSpec.parse({**data, "seed": 7, **overrides})


FRAMES = {"type": "frames", "every": 2, "format": "png"}
IMAGE = "file:///in.png"
CASES: dict[str, tuple[RenderSpec, dict[str, Image.Image]]] = {
    "sd15-text2img": (spec(num_images=2, negative_prompt="blurry"), {}),
    "sd15-cutoff-frames": (
        spec(callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}, FRAMES], num_images=2),
        {},
    ),
    "sd15-img2img": (spec(pipeline="img2img", image=IMAGE, strength=0.6), {"image": pattern()}),
    "sd15-inpaint": (
        spec(pipeline="inpaint", image=IMAGE, mask_image="file:///mask.png", strength=0.9),
        {"image": pattern(), "mask_image": pattern("L")},
    ),
    "sd15-controlnet": (spec(pipeline="controlnet", control_image=IMAGE), {"control_image": pattern(seed=5)}),
    "sd15-ip-adapter": (
        spec(
            ip_adapter={"image": IMAGE, "scale": 0.7},
            callbacks=[{"type": "ip_adapter_scale_cutoff", "step_ratio": 0.5}],
        ),
        {"ip_adapter_image": pattern(seed=9)},
    ),
    "sd15-lora-clipskip-dpmpp": (
        spec(loras=[{"name": "tiny-lora", "scale": 0.8}], clip_skip=1, scheduler="dpmpp_2m"),
        {},
    ),
    "sd15-heun-budget": (spec(scheduler="heun", callbacks=[{"type": "step_budget", "max_steps": 3}]), {}),
    "sdxl-text2img-cutoff": (
        spec("tiny-sdxl", num_images=2, scheduler="euler_a", callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.5}]),
        {},
    ),
    "sdxl-img2img": (spec("tiny-sdxl", pipeline="img2img", image=IMAGE, strength=0.7), {"image": pattern(seed=2)}),
}
SHARED = (
    spec(prompt="a red barn", callbacks=[FRAMES]),
    spec(prompt="a blue boat", seed=11, num_images=2, callbacks=[FRAMES]),
)


def pixels(storage: LocalStorage, urls: list[str]) -> list[np.ndarray]:
    found = []
    for url in urls:
        data = storage.get(storage.name_of(url) or url)
        assert data is not None, url
        found.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return found


def render_case(name: str, registry: ModelRegistry, root: Path) -> list[np.ndarray]:
    """The case's images, then its frames, as (h, w, 3) uint8 arrays."""
    storage = LocalStorage(root / name)
    if name == "shared-call":
        prepared = [
            prepare(JobContext(each, task_id=f"shared-{i}"), registry, storage) for i, each in enumerate(SHARED)
        ]
        outcomes = denoise_batch(prepared, registry)
        manifests = [store(each, outcome, storage) for each, outcome in zip(prepared, outcomes, strict=True)]
        assert all(len(m.batched_with) == 1 for m in manifests), "the two jobs did not share the call"
    else:
        job_spec, inputs = CASES[name]
        manifests = [render(JobContext(job_spec, task_id=name, inputs=inputs), registry=registry, storage=storage)]
    arrays: list[np.ndarray] = []
    for manifest in manifests:
        assert manifest.status in ("succeeded", "interrupted"), manifest.error
        arrays += pixels(storage, manifest.images) + pixels(storage, manifest.frames)
    return arrays


NAMES = [*CASES, "shared-call"]


def golden_registry() -> ModelRegistry:
    # One torch thread, when written and when compared: float sums split over more threads round differently, and
    # `make test` runs its test processes with one thread each.
    torch.set_num_threads(1)
    return ModelRegistry(
        default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=2, loras=default_loras()
    )


@pytest.fixture(scope="module")
def golden() -> Iterator[ModelRegistry]:
    threads = torch.get_num_threads()
    try:
        yield golden_registry()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_sd_renders_the_pixels_they_rendered_before_the_family_layer(
    name: str, golden: ModelRegistry, tmp_path: Path
) -> None:
    arrays = render_case(name, golden, tmp_path)
    stored = sorted(GOLDEN.glob(f"{name}.*.png"), key=lambda path: int(path.name.split(".")[1]))
    assert len(stored) == len(arrays), f"{name}: {len(arrays)} images and frames now, {len(stored)} before"
    for index, (array, path) in enumerate(zip(arrays, stored, strict=True)):
        before = np.asarray(Image.open(path).convert("RGB"))
        assert same_render(array, before), (
            f"{name}: image {index} differs from {path.name}: {difference(array, before)}"
        )


# Byte-equal only on the CPU that wrote the references: another one's kernels (AVX-512's wider sums, MKL's and
# oneDNN's own dispatch, which nothing pins from inside a test process) round floats differently. Measured on an
# AVX-512 Xeon against them: most images equal or 1 level off in a few pixels (mean |diff| <= 0.0002), the LoRA +
# DPM++ case (LoRA strength 4, a multistep sampler) mean 0.38, max 7, 98.9 % of values within 2 levels. A real
# change of what is rendered moves far more: that case with its LoRA off differs by a mean of 22.6 levels (10.8 %
# within 2), with the LoRA's scale 0.7 for 0.8 by 16.1 (15.7 %).
MEAN_LEVELS = 0.5
WITHIN_TWO = 0.95


def difference(array: np.ndarray, before: np.ndarray) -> str:
    delta = np.abs(array.astype(int) - before.astype(int))
    return f"mean |diff| {delta.mean():.4f}, max {delta.max()}, {(delta <= 2).mean():.1%} within 2 levels"


def same_render(array: np.ndarray, before: np.ndarray) -> bool:
    """The same picture, down to one platform's float rounding: byte-equal on the machine that wrote it."""
    if array.shape != before.shape:
        return False
    delta = np.abs(array.astype(int) - before.astype(int))
    return bool(delta.mean() <= MEAN_LEVELS and (delta <= 2).mean() >= WITHIN_TWO)


def write(registry_factory: Callable[[], ModelRegistry] = golden_registry) -> None:
    registry = registry_factory()
    with tempfile.TemporaryDirectory() as folder:
        for name in NAMES:
            for old in GOLDEN.glob(f"{name}.*.png"):
                old.unlink()
            for index, array in enumerate(render_case(name, registry, Path(folder))):
                Image.fromarray(array).save(GOLDEN / f"{name}.{index}.png")
            sys.stdout.write(f"{name} written\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    write()
