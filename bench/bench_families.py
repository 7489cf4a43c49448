"""Benchmark each model family on its tiny model: what the worker adds per step, what batching gains, how close the
preview is to the VAE.

Per family (tiny-sd15, tiny-sdxl, tiny-sd3, tiny-flux; random weights, float32, CPU):

1. Worker vs bare per step: `worker.engine.rendering.render()` with the step hooks a worker gives every job (a
   progress report posted to a `ProgressBox`, a far `Deadline`, the `StepTimer` metric) and the spec's frames every
   few steps and a step budget that never runs out, against the bare pipeline call with the same arguments
   (`pipeline_arguments`) and no callbacks. Per step: the manifest's `timings.denoise / steps_completed` against the
   bare call's time to its VAE decode, over steps (as in `bench/bench_worker.py`). The lease and revocation hooks
   need Redis and are left out: `bench/bench_render.py` measures them.
2. Batching gain: four compatible jobs (one `shared_call_key`, their own prompts and seeds) through
   `worker.engine.batching.denoise_batch` as one pipeline call, against the same four through
   `worker.engine.rendering.denoise` one after another: wall time of the four alone over the batch's, i.e. images
   per second batched over alone. Jobs are prepared outside the timing.
3. Preview PSNR: latents captured at the last step of a real pipeline call (the `render()` arguments, four seeds),
   previewed with the family's `preview` (SD 1.5 and SDXL: their fixed factors; SD3 and Flux: the map fitted to
   the loaded VAE on first use) and scored with `preview_fit.psnr` against the pipeline's own output for those
   latents, averaged down to the preview's grid; beside it the best constant preview (each image's mean colour).
   The first preview of a flow model includes its fit: its time is printed, then a preview's own.

Comparisons are interleaved (rotated rounds after a warm-up round), medians.

    python bench/bench_families.py [--repeats 10] [--torch-threads 1] [--models tiny-sd15,tiny-sdxl,tiny-sd3,tiny-flux]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from bench_worker import BareCall
from common import PROMPT, Section, interleaved, median, percent, set_threads, spread

from producer import RenderSpec
from worker.engine.batching import denoise_batch, shared_call_key
from worker.engine.job import JobContext
from worker.engine.rendering import Denoised, Prepared, denoise, pipeline_arguments, prepare, render
from worker.metrics import StepTimer
from worker.models.families import ModelFamily, family_named
from worker.models.preview_fit import downsample, psnr, to_uint8
from worker.models.registry import ModelRegistry
from worker.process.gpu import Deadline, ProgressBox
from worker.process.jobcontrol import ProgressReport
from worker.settings import WorkerSettings
from worker.storage import LocalStorage

MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux")
SIZE = 128
STEPS = 8
FRAMES_EVERY = 2
BATCH = 4
PREVIEW_IMAGES = 4
PREVIEW_CALLS = 20
PROGRESS_INTERVAL = WorkerSettings().progress_interval


def spec_for(model: str, *, seed: int = 1, prompt: str = PROMPT, images: int = 1, worker: bool = False) -> RenderSpec:
    """A text2img spec at the bench's size; `worker` adds the callbacks a worker's job usually carries."""
    callbacks: list[dict[str, Any]] = (
        [{"type": "frames", "every": FRAMES_EVERY}, {"type": "step_budget", "max_seconds": 1e9}] if worker else []
    )
    return RenderSpec.parse(
        {
            "model": model,
            "prompt": prompt,
            "num_inference_steps": STEPS,
            "width": SIZE,
            "height": SIZE,
            "seed": seed,
            "num_images": images,
            "callbacks": callbacks,
        }
    )


@dataclass
class FamilyResult:
    model: str
    family: ModelFamily
    bare_step: list[float]
    worker_step: list[float]
    alone: list[float]  # seconds for the BATCH jobs one after another
    batched: list[float]  # seconds for the same jobs in one call
    psnr: float
    mean_colour_psnr: float
    first_preview: float  # seconds: the fit and one preview for a flow family, one preview for SD
    preview: float  # seconds of one preview once fitted (median)

    @property
    def step_ratio(self) -> float:
        return median(self.worker_step) / median(self.bare_step)

    @property
    def batching_gain(self) -> float:
        return median(self.alone) / median(self.batched)

    @property
    def fitted(self) -> bool:
        return self.family.name in ("sd3", "flux")


class FamilyBench:
    """One model's pipeline, its registry and a scratch storage."""

    def __init__(self, model: str, registry: ModelRegistry) -> None:
        self.model = model
        self.registry = registry
        self.family = family_named(registry.source(model).family)
        self.pipe = registry.pipeline(model)
        self.storage = LocalStorage(tempfile.mkdtemp(prefix="bench-families-"))

    # --- 1. worker vs bare per step ----------------------------------------------------------------------------

    def worker_step(self) -> float:
        """Seconds per step of `render()` with a worker's hooks and callbacks (the manifest's denoise time)."""
        box = ProgressBox()
        job = JobContext(
            spec_for(self.model, worker=True),
            hooks=[ProgressReport(box.post, interval=PROGRESS_INTERVAL), Deadline(3600.0), StepTimer(self.model)],
        )
        manifest = render(job, registry=self.registry, storage=self.storage)
        if manifest.status != "succeeded" or manifest.timings.denoise is None or manifest.steps_completed != STEPS:
            raise RuntimeError(f"{self.model}: render ended {manifest.status} after {manifest.steps_completed} steps")
        return manifest.timings.denoise / manifest.steps_completed

    def per_step(self, repeats: int) -> tuple[list[float], list[float]]:
        bare = BareCall(self.pipe, spec_for(self.model))

        def bare_step() -> float:
            bare()
            return bare.denoise[-1] / STEPS

        samples = interleaved({"bare": bare_step, "worker": self.worker_step}, repeats, self_timed=True)
        return samples["bare"], samples["worker"]

    # --- 2. batching gain --------------------------------------------------------------------------------------

    def jobs(self) -> list[Prepared]:
        specs = [spec_for(self.model, seed=1 + i, prompt=f"{PROMPT}, view {i}") for i in range(BATCH)]
        if len({shared_call_key(spec) for spec in specs}) != 1:
            raise RuntimeError(f"{self.model}: the bench's jobs do not share one call")
        return [prepare(JobContext(spec), self.registry, self.storage) for spec in specs]

    def alone(self) -> float:
        prepared = self.jobs()
        started = time.perf_counter()
        outcomes = [denoise(each, self.registry) for each in prepared]
        elapsed = time.perf_counter() - started
        check_outcomes(self.model, outcomes, batched=False)
        return elapsed

    def batched(self) -> float:
        prepared = self.jobs()
        started = time.perf_counter()
        outcomes = denoise_batch(prepared, self.registry)
        elapsed = time.perf_counter() - started
        check_outcomes(self.model, outcomes, batched=True)
        return elapsed

    def batching(self, repeats: int) -> tuple[list[float], list[float]]:
        samples = interleaved({"alone": self.alone, "batched": self.batched}, repeats, self_timed=True)
        return samples["alone"], samples["batched"]

    # --- 3. preview PSNR ---------------------------------------------------------------------------------------

    def last_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop's latents at its last step and the pipeline's output pixels (n, 3, H, W) for them."""
        spec = spec_for(self.model, images=PREVIEW_IMAGES)
        captured: dict[str, torch.Tensor] = {}

        def capture(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            captured["latents"] = kwargs["latents"].clone()  # each step overwrites it: the last one stays
            return kwargs

        arguments = pipeline_arguments(spec, {}, [1 + i for i in range(PREVIEW_IMAGES)])
        with torch.inference_mode():
            output = self.pipe(
                **arguments,
                output_type="pt",
                callback_on_step_end=capture,
                callback_on_step_end_tensor_inputs=["latents"],
            )
        return captured["latents"], output.images.cpu()

    def preview_scores(self) -> tuple[float, float, float, float]:
        """PSNR of the preview and of each image's mean colour; seconds of the first preview and of one after."""
        latents, pixels = self.last_step()
        started = time.perf_counter()
        preview = self.family.preview(self.pipe, latents, SIZE, SIZE).cpu()
        first = time.perf_counter() - started
        calls = []
        for _ in range(PREVIEW_CALLS):
            started = time.perf_counter()
            self.family.preview(self.pipe, latents, SIZE, SIZE)
            calls.append(time.perf_counter() - started)
        reference = to_uint8(downsample(pixels.double(), pixels.shape[2] // preview.shape[1]))
        mean = reference.double().mean(dim=(1, 2), keepdim=True).round().to(torch.uint8).expand_as(reference)
        return psnr(preview, reference), psnr(mean.contiguous(), reference), first, median(calls)

    def run(self, repeats: int) -> FamilyResult:
        # The preview first: the worker's frames would fit a flow model's map before it could be timed.
        scores = self.preview_scores()
        bare_step, worker_step = self.per_step(repeats)
        alone, batched = self.batching(repeats)
        return FamilyResult(self.model, self.family, bare_step, worker_step, alone, batched, *scores)


def check_outcomes(model: str, outcomes: list[Denoised], *, batched: bool) -> None:
    for outcome in outcomes:
        if outcome.error is not None or outcome.pixels is None:
            raise RuntimeError(f"{model}: a job failed: {outcome.error or outcome.stop}")
        if batched and len(outcome.batched_with) != BATCH - 1:
            raise RuntimeError(f"{model}: a job ran outside the shared call")


def cell(values: list[float], scale: float, digits: int) -> str:
    return f"{median(values) * scale:.{digits}f} (±{spread(values):.0%})"


def report(results: list[FamilyResult], section: Section) -> None:
    rows = []
    for r in results:
        rows.append(
            [
                f"{r.model} ({r.family.name})",
                cell(r.bare_step, 1e3, 2),
                cell(r.worker_step, 1e3, 2),
                f"{r.step_ratio:.3f}x ({percent(r.step_ratio)})",
                cell(r.alone, 1e3, 0),
                cell(r.batched, 1e3, 0),
                f"{r.batching_gain:.2f}x",
            ]
        )
    section.table(
        [
            "model (family)",
            "bare ms/step",
            "worker ms/step",
            "worker / bare (step)",
            f"{BATCH} jobs alone, ms",
            f"{BATCH} jobs in one call, ms",
            "batching gain (images/s)",
        ],
        rows,
    )
    rows = []
    for r in results:
        rows.append(
            [
                f"{r.model} ({r.family.name})",
                "fitted to its VAE" if r.fitted else "fixed factors",
                f"{r.psnr:.2f}",
                f"{r.mean_colour_psnr:.2f}",
                f"{r.first_preview * 1e3:.1f}" + (" (with the fit)" if r.fitted else ""),
                f"{r.preview * 1e3:.2f}",
            ]
        )
    section.table(
        ["model (family)", "preview", "PSNR dB", "each image's mean colour, PSNR dB", "first preview ms", "preview ms"],
        rows,
        align="llrrrr",
    )


def run(repeats: int = 10, threads: int = 1, models: tuple[str, ...] = MODELS) -> Section:
    set_threads(threads)
    rounds = -(-repeats // 2) * 2  # a multiple of the two cases, so each goes first equally often
    section = Section(
        "Model families: worker vs bare per step, batching gain, preview PSNR",
        f"`bench/bench_families.py`: tiny models (random weights), float32, CPU, torch threads {threads}, "
        f"{SIZE}x{SIZE}, {STEPS} steps, default sampler. Per step: `render()` with a worker's step hooks (progress, "
        f"deadline, step timer), frames every {FRAMES_EVERY} steps and a step budget never reached, vs the bare "
        f"pipeline call with the same arguments; batching: {BATCH} compatible jobs through `denoise_batch` vs the "
        f"same {BATCH} through `denoise` one by one (gain = their time over the batch's). {rounds} interleaved rounds "
        f"after a warm-up, medians, ± = half the IQR. Preview: {PREVIEW_IMAGES} images' last-step latents, the "
        "family's `preview` against the pipeline's decode of them averaged to the preview's grid; the mean colour "
        f"is the best constant preview; preview ms is the median of {PREVIEW_CALLS} calls.",
    )
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu", dtype="float32"))
    results = []
    for model in models:
        results.append(FamilyBench(model, registry).run(rounds))
    report(results, section)
    section.line(
        "The tiny models' steps are a few ms of Python dispatch between small torch ops, and the worker's hooks and "
        "frames add a roughly fixed cost per step, so its share here is far larger than at real step times. The "
        "VAEs and denoisers have random weights: the PSNR compares the previews with each other and with the best "
        "constant colour on these latents, not with a real model's (the fixed SD factors were made for the real "
        "SD VAEs, not these)."
    )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    run(args.repeats, args.torch_threads, tuple(args.models.split(",")))


if __name__ == "__main__":
    main()
