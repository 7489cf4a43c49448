"""Benchmark the step caches per family on its tiny model: time saved against the uncached run, and what it costs
the image (PSNR of the cached image against the uncached one), in one run.

Per family whose model takes a step cache (`ModelFamily.step_caches`), one job three ways: no cache,
`first_block` (threshold 0.5) and `taylorseer` (every 3rd step after 3 in full), all through
`worker.engine.rendering.render()`, rotated rounds after a warm-up, medians. The tiny models' random weights make
their activations change more from step to step than a trained model's, so a cache skips less here than
published figures on real Flux/Qwen (up to 2-3x); the ratio is the tiny model's, the method is the real one.

    python bench/bench_step_cache.py [--repeats 6] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from typing import Any

import numpy as np
import torch
from common import Section, interleaved, median, set_threads, spread
from PIL import Image

from producer import RenderSpec
from worker.engine.job import JobContext
from worker.engine.rendering import render
from worker.models.families import FAMILIES
from worker.models.preview_fit import psnr
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings
from worker.storage import LocalStorage

SIZE = 128
STEPS = 20
CACHES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "first_block": {"type": "first_block", "threshold": 0.5},
    "taylorseer": {"type": "taylorseer", "interval": 3, "warmup_steps": 3},
}


def models_with_caches(registry: ModelRegistry) -> list[str]:
    """The first built-in model of each family that takes step caches."""
    found: dict[str, str] = {}
    for name, source in registry.models.items():
        if source.tiny and FAMILIES[source.family].step_caches and source.family not in found:
            found[source.family] = name
    return list(found.values())


def spec(model: str, cache: dict[str, Any] | None) -> RenderSpec:
    data: dict[str, Any] = {"model": model, "prompt": "a lighthouse at dusk", "num_inference_steps": STEPS}
    return RenderSpec.parse({**data, "width": SIZE, "height": SIZE, "seed": 3, "cache": cache})


def run(repeats: int = 6, threads: int = 1) -> Section:
    set_threads(threads)
    rounds = -(-repeats // 6) * 6  # a multiple of both case counts (2 or 3), so each case goes first equally often
    section = Section(
        "Step caches: time saved and the image's difference, per family",
        f"`bench/bench_step_cache.py`: tiny models (random weights), float32, CPU, torch threads {threads}, "
        f"{SIZE}x{SIZE}, {STEPS} steps; `render()` with no cache, `first_block` (threshold 0.5) and `taylorseer` "
        f"(interval 3, 3 warm-up steps); {rounds} rotated rounds after a warm-up, medians, ± = half the IQR. PSNR: "
        "the cached image against the uncached one (inf: identical).",
    )
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu", dtype="float32"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        storage = LocalStorage(folder)
        for model in models_with_caches(registry):
            images: dict[str, np.ndarray] = {}

            def job(name: str, model: str = model, images: dict[str, np.ndarray] = images) -> None:
                manifest = render(JobContext(spec(model, CACHES[name])), registry=registry, storage=storage)
                data = storage.get(storage.name_of(manifest.images[0]) or "")
                assert data is not None
                images[name] = np.array(Image.open(io.BytesIO(data)).convert("RGB"))

            offered = FAMILIES[registry.source(model).family].step_caches
            names = [name for name in CACHES if name == "none" or name in offered]
            times = interleaved({name: (lambda name=name: job(name)) for name in names}, rounds)
            base = median(times["none"])
            reference = torch.from_numpy(images["none"])[None]
            for name in names:
                score = psnr(torch.from_numpy(images[name])[None], reference)
                rows.append(
                    [
                        f"{model} ({registry.source(model).family})",
                        name,
                        f"{median(times[name]) * 1e3:.0f} (±{spread(times[name]):.0%})",
                        f"{base / median(times[name]):.2f}x",
                        "inf" if score == float("inf") else f"{score:.1f}",
                    ]
                )
    section.table(["model (family)", "cache", "ms per job", "speed-up", "PSNR dB vs uncached"], rows, align="llrrr")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    run(args.repeats, args.torch_threads)


if __name__ == "__main__":
    main()
