"""Benchmark: what an unfused LoRA costs per denoising step, against none, side by side in one process.

1. tiny-sd15 through the worker's own path (`ModelRegistry.loras_applied`): a pristine pipeline that never held a
   LoRA, the registry's pipeline with tiny-lora on (rank 4, UNet attention and text encoder), and the same with
   it loaded but off, which is what a job without LoRAs pays once LoRA jobs have run. A step is timed from one
   step's end to the next (step callbacks), so prompt encoding, the VAE and switching adapters are not in it.
2. A UNet of SD 1.5's published architecture (`bench_gpu.SD15_UNET`, random weights), one forward at CFG batch 2
   on 16x16 latents (a 128x128 image, to fit a CPU run): no LoRA, and rank 4 and rank 64 on every attention
   projection, loaded with diffusers' `load_lora_adapter` as `load_lora_weights` does. Its rounds are fewer
   (`--wide-repeats`): a forward takes seconds on a CPU.

Rounds are interleaved (A B C, B C A, C A B, ...) after a warm-up round; figures are medians.

    python bench/bench_lora.py [--repeats 7] [--wide-repeats 4] [--torch-threads 1] [--parts tiny,wide]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from bench_gpu import SD15_UNET
from common import PROMPT, Section, interleaved, median, set_threads, spread
from diffusers import UNet2DConditionModel

from producer.spec import LoraRef
from worker.models import tiny_sd15
from worker.models.loras import tiny_state_dict
from worker.models.registry import ModelRegistry
from worker.settings import default_models

TINY_SIZE, TINY_STEPS = 256, 12
WIDE_LATENT = 16


# --- 1. tiny-sd15, the worker's path -------------------------------------------------------------------------


def step_seconds(pipe: Any) -> float:
    """Median seconds between consecutive step ends of one `pipe(...)` call to the latents."""
    ends: list[float] = []

    def mark(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        ends.append(time.perf_counter())
        return kwargs

    with torch.inference_mode():
        pipe(
            prompt=PROMPT,
            num_inference_steps=TINY_STEPS,
            width=TINY_SIZE,
            height=TINY_SIZE,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
            callback_on_step_end=mark,
        )
    return median([b - a for a, b in zip(ends, ends[1:], strict=False)])


def tiny_cases() -> dict[str, Callable[[], float]]:
    registry = ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32)
    pipe = registry.pipeline("tiny-sd15")
    pristine = tiny_sd15.build()
    pristine.set_progress_bar_config(disable=True)

    def with_loras(refs: list[LoraRef]) -> Callable[[], float]:
        def run() -> float:
            with registry.loras_applied("tiny-sd15", pipe, refs):
                return step_seconds(pipe)

        return run

    return {
        "none": lambda: step_seconds(pristine),
        "tiny-lora loaded, off": with_loras([]),
        "tiny-lora on": with_loras([LoraRef(name="tiny-lora")]),
    }


# --- 2. SD 1.5 widths, the UNet alone -------------------------------------------------------------------------


def wide_cases() -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    with torch.device("meta"):  # a second module tree on the same weight tensors: no copy, no second init
        pristine = UNet2DConditionModel(**SD15_UNET).eval()
    pristine.load_state_dict(unet.state_dict(), assign=True)
    for rank in (4, 64):
        weights = tiny_state_dict(SimpleNamespace(unet=pristine), rank=rank)
        with warnings.catch_warnings():  # peft warns about every adapter after the first; two are the point here
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
            unet.load_lora_adapter(weights, prefix="unet", adapter_name=f"rank{rank}")
    sample = torch.randn(2, 4, WIDE_LATENT, WIDE_LATENT)
    context = torch.randn(2, 77, SD15_UNET["cross_attention_dim"])

    def forward(model: Any, adapter: str | None) -> Callable[[], float]:
        def run() -> float:
            if adapter is not None:
                unet.set_adapters([adapter], weights=[1.0])
            with torch.inference_mode():
                started = time.perf_counter()
                model(sample, 500, context)
                return time.perf_counter() - started

        return run

    return {
        "none": forward(pristine, None),
        "rank 4 on": forward(unet, "rank4"),
        "rank 64 on": forward(unet, "rank64"),
    }


# --- entry points --------------------------------------------------------------------------------------------


def report(title: str, samples: dict[str, list[float]], section: Section) -> None:
    base = median(samples["none"])
    rows = [
        [name, f"{median(values) * 1e3:.2f} (±{spread(values):.1%})", f"x{median(values) / base:.3f}"]
        for name, values in samples.items()
    ]
    section.line(title)
    section.line()
    section.table(["case", "median ms/step", "vs none"], rows)


def run(
    *, repeats: int = 7, wide_repeats: int = 4, threads: int = 1, parts: tuple[str, ...] = ("tiny", "wide")
) -> Section:
    set_threads(threads)
    section = Section(
        "LoRA cost per step (unfused)",
        f"`bench/bench_lora.py`: torch threads {threads}, {repeats} interleaved rounds, medians; an adapter is "
        "switched on with `set_adapters` and off with `disable_lora`, never fused.",
    )
    if "tiny" in parts:
        samples = interleaved(tiny_cases(), repeats, self_timed=True)
        report(f"tiny-sd15, {TINY_SIZE}x{TINY_SIZE}, through `ModelRegistry.loras_applied`:", samples, section)
        ratio = median(samples["tiny-lora on"]) / median(samples["none"])
        section.line(f"lora: unfused tiny-lora x{ratio:.2f} per step (median of {repeats} interleaved rounds)")
        off = median(samples["tiny-lora loaded, off"]) / median(samples["none"])
        section.line(f"lora: loaded but off x{off:.2f} per step (a job without LoRAs after LoRA jobs)")
        section.line()
    if "wide" in parts:
        samples = interleaved(wide_cases(), wide_repeats, self_timed=True)
        report(
            f"UNet of SD 1.5 widths, one forward at batch 2, {WIDE_LATENT}x{WIDE_LATENT} latents:",
            samples,
            section,
        )
        for case in ("rank 4 on", "rank 64 on"):
            ratio = median(samples[case]) / median(samples["none"])
            section.line(
                f"lora: SD 1.5 widths, {case} x{ratio:.3f} per step (median of {wide_repeats} interleaved rounds)"
            )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wide-repeats", type=int, default=4)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--parts", default="tiny,wide")
    args = parser.parse_args()
    run(
        repeats=args.repeats,
        wide_repeats=args.wide_repeats,
        threads=args.torch_threads,
        parts=tuple(args.parts.split(",")),
    )


if __name__ == "__main__":
    main()
