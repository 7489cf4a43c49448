"""Benchmark: the bare diffusers loop vs the same job through `render()`, and what a CFG cutoff saves.

Two parts, in one process:
1. whole jobs, interleaved (A B C A B C ...) so drift hits every case alike; medians and ratios;
2. the time each callback spends on the denoising thread per step, called directly on the
   pipeline's real tensors (what a GPU loop would wait for; background frame encoding excluded).

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
from producer.errors import JobRevoked  # noqa: E402
from worker.callbacks import StepInfo, build_callbacks  # noqa: E402
from worker.models.registry import ModelRegistry  # noqa: E402
from worker.render import render  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.storage import LocalStorage  # noqa: E402


def make_spec(args: argparse.Namespace, callbacks: list[dict[str, Any]]) -> RenderSpec:
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds of each case; noise on a shared machine only adds, so the minimum is steadier."""
    for fn in cases.values():  # warm-up: allocator, kernels, caches
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - started)
    return (
        {name: statistics.median(values) for name, values in samples.items()},
        {name: min(values) for name, values in samples.items()},
    )


class NeverRevoked:
    """The shape of the worker's per-step revocation hook, minus the Redis round trip."""

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed < 0:
            raise JobRevoked(info.steps_completed)


def callback_costs(args: argparse.Namespace, pipe: Any, family: str, storage: LocalStorage) -> dict[str, float]:
    """Microseconds each callback spends on the calling thread per step, on real latents and embeddings."""
    spec = make_spec(
        args,
        [
            {"type": "cfg_cutoff", "step_ratio": 1.0},
            {"type": "step_budget", "max_seconds": 1e9},
            {"type": "frames", "every": 1, "size": 128},
        ],
    )
    captured: dict[str, Any] = {}

    def capture(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        captured.update(kwargs)
        return kwargs

    inputs = ["latents", "prompt_embeds"] + (["add_text_embeds", "add_time_ids"] if family == "sdxl" else [])
    pipe(
        prompt=spec.prompt,
        num_inference_steps=2,
        width=args.size,
        height=args.size,
        num_images_per_prompt=args.images,
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=inputs,
    )
    stack = build_callbacks(spec, family, task_id="bench", storage=storage, hooks=[NeverRevoked()])
    stack.start()
    costs = {}
    device = pipe.device  # a property that walks every module: read it once, outside the timing
    for callback in stack.multi.callbacks:
        name = type(callback).__name__
        samples = []
        for i in range(200):
            kwargs = dict(captured)
            sync(device)
            started = time.perf_counter()
            callback(pipe, 0 if name.endswith("CutoffCallback") else i, 0, kwargs)
            sync(device)
            samples.append(time.perf_counter() - started)
            if stack.frames and stack.frames._futures:  # let the background encode finish outside the timing
                stack.frames._futures[-1].result()
        costs[name] = statistics.median(samples) * 1e6
    if stack.frames:
        stack.frames.finish()
    return costs


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
    family = registry.source(args.model).family
    storage = LocalStorage(tempfile.mkdtemp(prefix="bench-render-"))
    plain = make_spec(args, [])

    def bare() -> None:
        pipe(
            prompt=plain.prompt,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            num_images_per_prompt=args.images,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    def job(callbacks: list[dict[str, Any]]) -> Callable[[], Any]:
        spec = make_spec(args, callbacks)
        return lambda: render(spec, registry=registry, storage=storage)

    # cutoff at ratio 1.0 and a budget of all steps run at every step but leave the work unchanged.
    results, fastest = interleaved(
        {
            "bare diffusers loop": bare,
            "render(), no callbacks": job([]),
            "render(), cutoff@1.0 + budget": job(
                [{"type": "cfg_cutoff", "step_ratio": 1.0}, {"type": "step_budget", "max_steps": args.steps}]
            ),
            "render(), + frames every step": job(
                [
                    {"type": "cfg_cutoff", "step_ratio": 1.0},
                    {"type": "step_budget", "max_steps": args.steps},
                    {"type": "frames", "every": 1, "size": 128},
                ]
            ),
            "render(), cfg_cutoff@0.4": job([{"type": "cfg_cutoff", "step_ratio": 0.4}]),
        },
        args.repeats,
        registry.device,
    )
    costs = callback_costs(args, pipe, family, storage)

    base = results["bare diffusers loop"]
    print(
        f"# bench_render: {args.model}, {args.steps} steps, {args.size}x{args.size}, {args.images} image(s), "
        f"median of {args.repeats}"
    )
    print(
        f"# device={registry.device} dtype={registry.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} cpus={os.cpu_count()} python={platform.python_version()}"
    )
    print("\n| case | median s/job | steps/s | vs bare | min s/job | vs bare (min) |\n|---|---:|---:|---:|---:|---:|")
    for name, seconds in results.items():
        low = fastest[name]
        print(
            f"| {name} | {seconds:.4f} | {args.steps / seconds:.1f} | {seconds / base:.3f}x "
            f"| {low:.4f} | {low / fastest['bare diffusers loop']:.3f}x |"
        )
    print("\n| callback (denoising thread) | µs/step |\n|---|---:|")
    for name, micros in costs.items():
        print(f"| {name} | {micros:.1f} |")
    print(f"| whole stack | {sum(costs.values()):.1f} |")
    step = base / args.steps
    no_cb = results["render(), no callbacks"]
    print(
        f"\nbare step: {step * 1e3:.2f} ms; stack on the denoising thread: "
        f"{sum(costs.values()) / 1e6 / step:.2%} of a step"
    )
    print(f"render() vs bare loop (PNG encode + storage writes included): {no_cb / base - 1:+.1%}")
    print(f"cutoff@1.0 + budget vs no callbacks: {results['render(), cutoff@1.0 + budget'] / no_cb - 1:+.1%}")
    print(
        f"frames every step vs no callbacks (background encode shares the CPU): "
        f"{results['render(), + frames every step'] / no_cb - 1:+.1%}"
    )
    print(f"wall time saved by cfg_cutoff step_ratio=0.4: {1 - results['render(), cfg_cutoff@0.4'] / no_cb:.1%}")


if __name__ == "__main__":
    main()
