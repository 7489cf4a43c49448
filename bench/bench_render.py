"""Benchmark: the bare diffusers loop vs the same job through `render()`, and what a CFG cutoff saves.

Runs are interleaved (A B A B ...) in one process so drift hits both sides alike; the median of
each side is reported, with the ratios. Usage:

    python bench/bench_render.py [--model tiny-sd15] [--steps 30] [--size 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from producer import RenderSpec  # noqa: E402
from worker.models.registry import ModelRegistry  # noqa: E402
from worker.render import render  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.storage import LocalStorage  # noqa: E402


def spec(args: argparse.Namespace, callbacks: list[dict[str, Any]]) -> RenderSpec:
    return RenderSpec.parse(
        {
            "model": args.model,
            "prompt": "a lighthouse on a cliff at dusk",
            "num_inference_steps": args.steps,
            "width": args.size,
            "height": args.size,
            "seed": 1,
            "num_images": args.images,
            "callbacks": callbacks,
        }
    )


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    for fn in cases.values():  # warm-up: allocator, kernels, caches
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    registry = ModelRegistry.from_settings(WorkerSettings())
    pipe = registry.pipeline(args.model)
    storage = LocalStorage(tempfile.mkdtemp(prefix="bench-render-"))
    plain = spec(args, [])

    def bare() -> None:
        pipe(
            prompt=plain.prompt,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            num_images_per_prompt=args.images,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    # Callbacks that run at every step but leave the work unchanged: the cost of the stack itself.
    same_work = spec(
        args,
        [
            {"type": "cfg_cutoff", "step_ratio": 1.0},
            {"type": "frames", "every": 1, "size": 128},
            {"type": "step_budget", "max_steps": args.steps},
        ],
    )
    cutoff = spec(args, [{"type": "cfg_cutoff", "step_ratio": 0.4}])

    results = interleaved(
        {
            "bare diffusers loop": bare,
            "render() no callbacks": lambda: render(plain, registry=registry, storage=storage),
            "render() cutoff+frames+budget": lambda: render(same_work, registry=registry, storage=storage),
            "render() cfg cutoff @0.4": lambda: render(cutoff, registry=registry, storage=storage),
        },
        args.repeats,
        registry.device,
    )
    base = results["bare diffusers loop"]
    print(
        f"# bench_render: {args.model}, {args.steps} steps, {args.size}x{args.size}, {args.images} image(s), "
        f"median of {args.repeats}"
    )
    print(
        f"# device={registry.device} dtype={registry.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} python={platform.python_version()} cpu={platform.processor() or '?'}"
    )
    print("| case | seconds/job | steps/s | vs bare |\n|---|---:|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.4f} | {args.steps / seconds:.1f} | {seconds / base:.3f}x |")
    with_stack = results["render() cutoff+frames+budget"]
    no_stack = results["render() no callbacks"]
    saved = 1 - results["render() cfg cutoff @0.4"] / no_stack
    print(
        f"\ncallback stack overhead per step: {(with_stack - no_stack) / args.steps * 1e3:.3f} ms "
        f"({with_stack / no_stack - 1:+.1%} of the job)"
    )
    print(f"render() vs bare loop (storage writes included): {no_stack / base - 1:+.1%}")
    print(f"wall time saved by cfg_cutoff step_ratio=0.4: {saved:.1%}")


if __name__ == "__main__":
    main()
