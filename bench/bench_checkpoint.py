"""Benchmark: what checkpoints cost per step, and what a resume saves a job stopped at 90 %.

In-process `render()` on tiny-sd15 at 256x256, one torch thread, local-directory storage:

- cost: 30-step jobs with a checkpoint at every step's end (the worst case: the default is one every 30 s)
  against the same jobs without checkpoints, interleaved; per step, from the manifests' denoise time;
- the GPU thread's time per checkpoint (the capture; serializing and storing run on the writer's thread);
- resume: a 150-step 512x512 job whose attempt stops at step 135 (its lease lost, as when its worker dies: only
  its checkpoints, every 0.5 s, remain), then attempt 2 from its checkpoint against attempt 2 from step 0.

    python bench/bench_checkpoint.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PROMPT, Section, interleaved, median, set_threads, spread

from producer import RenderSpec
from worker.engine.callbacks import StepInfo
from worker.engine.callbacks.checkpoint import CheckpointCallback
from worker.engine.job import JobContext
from worker.engine.rendering import denoise, prepare, render, store
from worker.engine.stops import LeaseLost
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings
from worker.storage import LocalStorage

EVERY_STEP = 1e-9


class LoseLeaseAt:
    """Ends the attempt at `step` with nothing written, once the checkpoints handed to the writer are stored."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.writer: Any = None

    def on_step(self, info: StepInfo) -> None:
        if info.steps_completed >= self.step:
            if self.writer is not None:
                self.writer.flush()
            raise LeaseLost(info.steps_completed, "bench")


def spec(steps: int, seed: int = 1, size: int = 256) -> RenderSpec:
    data = {"model": "tiny-sd15", "prompt": PROMPT, "num_inference_steps": steps, "width": size, "height": size}
    return RenderSpec.parse({**data, "seed": seed, "scheduler": "dpmpp_2m"})


class CaptureTimer:
    """Times `CheckpointCallback.capture`, the part of a checkpoint the GPU thread runs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._original = CheckpointCallback.capture

    def __enter__(self) -> CaptureTimer:
        original, seconds = self._original, self.seconds

        def timed(callback: CheckpointCallback, *args: Any) -> None:
            started = time.perf_counter()
            original(callback, *args)
            seconds.append(time.perf_counter() - started)

        CheckpointCallback.capture = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        CheckpointCallback.capture = self._original  # type: ignore[method-assign]


@dataclass
class CheckpointResults:
    step_ratio: float
    capture_ms: float
    resumed: float
    scratch: float
    resumed_from: int | None


def run(repeats: int = 5) -> tuple[Section, CheckpointResults]:
    set_threads(1)
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu"))
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    storage = LocalStorage(work)
    section = Section(
        "Checkpoints: cost per step and resume after a stop at 90 %",
        "`bench/bench_checkpoint.py`: tiny-sd15 at 256x256, DPM++ 2M, one torch thread, in-process `render()` with "
        "local-directory storage. Cost: 30-step jobs checkpointed at every step's end (the worst case; the default "
        "is every 30 s) against none, interleaved, per step from the manifests' denoise time. Resume: a 150-step "
        "job stopped at step 135 with checkpoints every second, then its second attempt from the checkpoint "
        f"against a second attempt from step 0. Medians of {repeats} rounds; ± = half the IQR.",
    )

    counter = iter(range(10**9))

    def per_step(seconds: float) -> float:
        job = JobContext(spec(30), f"cost-{next(counter)}", checkpoint_seconds=seconds)
        manifest = render(job, registry=registry, storage=storage)
        assert manifest.timings.denoise is not None
        return manifest.timings.denoise / manifest.steps_completed

    with CaptureTimer() as capture:
        costs = interleaved(
            {"none": lambda: per_step(0.0), "every step": lambda: per_step(EVERY_STEP)}, repeats, self_timed=True
        )
    capture_ms = median(capture.seconds) * 1e3
    none = median(costs["none"])
    ratio = median(costs["every step"]) / none
    rows = [
        [name, f"{median(values) * 1e3:.2f} (±{spread(values):.1%})", f"{median(values) / none:.3f}x"]
        for name, values in costs.items()
    ]
    section.table(["checkpoints", "ms per step", "of none"], rows)
    step_ms = none * 1e3
    section.line(
        f"- the GPU thread's capture: {capture_ms:.2f} ms per checkpoint (median of {len(capture.seconds)}); at the "
        f"default of one per 30 s that is {capture_ms / 30e3:.4%} of the denoising time, whatever the step "
        f"({step_ms:.1f} ms here)"
    )
    section.line()

    resumed_times, scratch_times, resumed_from = [], [], None
    for round_ in range(max(1, repeats // 2)):
        task = f"resume-{round_}"
        stop = LoseLeaseAt(135)
        first = JobContext(spec(150, size=512), task, hooks=[stop], checkpoint_seconds=0.5)
        prepared = prepare(first, registry, storage)
        stop.writer = prepared.record.checkpoints
        try:
            store(prepared, denoise(prepared, registry), storage)
        except LeaseLost:
            pass
        started = time.perf_counter()
        manifest = render(JobContext(spec(150, size=512), task, attempt=2), registry=registry, storage=storage)
        resumed_times.append(time.perf_counter() - started)
        resumed_from = manifest.resumed_from_step
        started = time.perf_counter()
        scratch = JobContext(spec(150, size=512), f"scratch-{round_}", attempt=2)
        fresh = render(scratch, registry=registry, storage=storage)
        scratch_times.append(time.perf_counter() - started)
        assert fresh.resumed_from_step is None
    section.table(
        ["second attempt of a job stopped at step 135 of 150", "seconds to its manifest"],
        [
            [f"from its checkpoint (step {resumed_from})", f"{median(resumed_times):.2f}"],
            ["from step 0", f"{median(scratch_times):.2f}"],
        ],
    )
    section.line(
        f"checkpoints: {capture_ms:.2f} ms of the GPU thread each (every step: {ratio - 1:+.1%} per step); "
        f"resume after a stop at 90 %: "
        f"{median(resumed_times):.2f} s vs {median(scratch_times):.2f} s from scratch "
        f"({median(scratch_times) / median(resumed_times):.1f}x sooner)"
    )
    return section, CheckpointResults(ratio, capture_ms, median(resumed_times), median(scratch_times), resumed_from)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rounds (noisy)")
    args = parser.parse_args()
    run(repeats=2 if args.quick else 5)


if __name__ == "__main__":
    main()
