"""Benchmark: what a real worker adds per denoising step over the bare diffusers call, on the same spec.

Starts a private redis-server and one `render worker` (local-directory storage), loads the same
pipeline in this process, and alternates, round by round: the bare call (`pipe(...)` with the
arguments `render()` passes, no callbacks) here, then the same spec submitted with `RenderClient`.

- per step, worker: the manifest's `timings.denoise / steps_completed` (from the call into the
  pipeline to the end of the last step: prompt encoding included, VAE decode not);
- per step, bare: the same interval, from the call to the start of the VAE decode (the VAE's
  `decode` is wrapped to note the time; nothing runs inside the loop);
- whole job: bare `pipe(...)` vs submit -> final state (queue, PNG encode, storage, manifest
  included; the client waits on the result backend's pub/sub, no polling, then reads the manifest).

Both sides use the same number of torch threads (RENDER_TORCH_THREADS in the worker).

    python bench/bench_worker.py [--repeats 7] [--torch-threads 1] [--model tiny-sd15]
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import PROMPT, Section, interleaved, median, percent, set_threads, spread, verdict

from localfarm.cluster import RedisServer, WorkerProcess, free_port
from producer import RenderSpec
from producer.client import RenderClient
from producer.settings import ClientSettings
from worker.engine.rendering import pipeline_arguments
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings

TARGET = 0.01  # the worker may add at most 1% per step at production step times


@dataclass(frozen=True)
class Case:
    label: str
    size: int
    steps: int


SMALL = Case("small", 256, 30)
PRODUCTION = Case("production-like", 640, 20)


@dataclass
class OverheadResult:
    case: Case
    bare_step: list[float]
    worker_step: list[float]
    bare_job: list[float]
    worker_job: list[float]
    hook_seconds: float | None = None  # the step hooks' mean cost per model call, timed inside the worker

    @property
    def step_ratio(self) -> float:
        return median(self.worker_step) / median(self.bare_step)

    @property
    def job_ratio(self) -> float:
        return median(self.worker_job) / median(self.bare_job)


def job_spec(model: str, case: Case, seed: int = 1) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": PROMPT,
        "num_inference_steps": case.steps,
        "width": case.size,
        "height": case.size,
        "seed": seed,
    }


class BareCall:
    """`pipe(...)` exactly as `render()` calls it, minus `callback_on_step_end`; notes when the VAE decode starts."""

    def __init__(self, pipe: Any, spec: RenderSpec) -> None:
        self.pipe = pipe
        self.spec = spec
        self.decode_started: float | None = None
        self.denoise: list[float] = []

    def __call__(self) -> None:
        spec = self.spec
        decode = self.pipe.vae.decode

        def noted_decode(*args: Any, **kwargs: Any) -> Any:
            if self.decode_started is None:
                self.decode_started = time.perf_counter()
            return decode(*args, **kwargs)

        self.pipe.vae.decode = noted_decode
        self.decode_started = None
        arguments = pipeline_arguments(spec, {}, [(spec.seed or 0) + i for i in range(spec.num_images)])
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                self.pipe(**arguments)
        finally:
            del self.pipe.vae.decode  # the instance attribute goes; the class's method shows again
        if self.decode_started is None:
            raise RuntimeError("the VAE decode never ran: cannot tell the denoising time of the bare call")
        self.denoise.append(self.decode_started - started)


def hook_totals(metrics_url: str, model: str) -> tuple[float, float]:
    """The worker's own step-hook counters (`worker.metrics`): seconds and model calls so far."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except urllib.error.URLError:  # the endpoint is not up (yet): nothing counted
        return 0.0, 0.0

    def total(name: str) -> float:
        found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return total("render_step_hook_seconds_total"), total("render_step_hook_calls_total")


def measure(client: RenderClient, pipe: Any, model: str, case: Case, repeats: int) -> OverheadResult:
    spec = job_spec(model, case)
    bare = BareCall(pipe, RenderSpec.parse(spec))
    worker_steps: list[float] = []

    def through_worker() -> None:
        task_id = client.submit(spec).task_id
        # Block on the result backend's pub/sub rather than polling: a client polling every few ms would
        # take CPU from the worker on a small machine, a cost the bare side does not pay.
        client.app.AsyncResult(task_id).get(timeout=600, propagate=False)
        manifest = client.wait(task_id, timeout=60)  # already final: one read (not in the timing's way)
        if manifest.status != "succeeded" or manifest.timings.denoise is None or not manifest.steps_completed:
            raise RuntimeError(f"worker job ended {manifest.status}: {manifest.error}")
        worker_steps.append(manifest.timings.denoise / manifest.steps_completed)

    samples = interleaved({"bare": bare, "worker": through_worker}, repeats)
    # The warm-up round's per-step figures are dropped with it.
    return OverheadResult(
        case=case,
        bare_step=[d / case.steps for d in bare.denoise[1:]],
        worker_step=worker_steps[1:],
        bare_job=samples["bare"],
        worker_job=samples["worker"],
    )


def report(results: list[OverheadResult], model: str, threads: int, repeats: int, section: Section) -> None:
    rows = []
    for r in results:
        c = r.case
        rows.append(
            [
                f"{c.label}: {model} {c.size}x{c.size}, {c.steps} steps",
                f"{median(r.bare_step) * 1e3:.2f} (±{spread(r.bare_step):.1%})",
                f"{median(r.worker_step) * 1e3:.2f} (±{spread(r.worker_step):.1%})",
                f"{r.step_ratio:.4f}x ({percent(r.step_ratio)})",
                f"{median(r.bare_job):.3f}",
                f"{median(r.worker_job):.3f}",
                f"{r.job_ratio:.3f}x ({percent(r.job_ratio)})",
            ]
        )
    section.line(f"Medians of {repeats} interleaved rounds; torch threads = {threads} on both sides; ± = half the IQR.")
    section.line()
    section.table(
        [
            "case",
            "bare ms/step",
            "worker ms/step",
            "worker / bare (step)",
            "bare s/job",
            "worker s/job (submit→done)",
            "worker / bare (job)",
        ],
        rows,
    )
    prod = results[-1]
    section.line(
        f"    target: the worker adds < {TARGET:.0%} per step at a production-like step time "
        f"({median(prod.bare_step) * 1e3:.0f} ms): {target_verdict(prod)}"
    )
    section.line()
    for r in results:
        section.line(f"- {hooks_line(r)}")


HOOKS_TARGET = 50e-6


def hooks_line(result: OverheadResult) -> str:
    """The step hooks' cost per model call as the worker timed it (its render_step_hook_* counters)."""
    c, cost = result.case, result.hook_seconds or 0.0
    return (
        f"step hooks inside the worker ({c.label}, {c.size}x{c.size}, {c.steps} steps): {cost * 1e6:.1f} µs per "
        f"model call (target < {HOOKS_TARGET * 1e6:.0f} µs): {verdict(cost < HOOKS_TARGET)}"
    )


def ratio_uncertainty(result: OverheadResult) -> float:
    """About two standard errors (~95%) of the per-step ratio, from each side's spread and sample count.

    A median's standard error is about 1.25 sigma / sqrt(n), and sigma about IQR / 1.35.
    """
    errors = [1.858 * spread(values) / math.sqrt(len(values)) for values in (result.bare_step, result.worker_step)]
    return 2 * math.sqrt(sum(e * e for e in errors))


def target_verdict(result: OverheadResult) -> str:
    """met / NOT met on the median ratio, with its uncertainty, flagged where the noise is larger than the target."""
    added, error = result.step_ratio - 1, ratio_uncertainty(result)
    text = f"{verdict(added < TARGET)} ({added:+.2%} ± {error:.2%})"
    if error >= TARGET:
        text += f"; this run's noise (± {error:.2%}) does not resolve {TARGET:.0%}: rerun on a quiet machine"
    return text


def run(
    *,
    model: str = "tiny-sd15",
    repeats: int = 7,
    threads: int = 1,
    cases: tuple[Case, ...] = (SMALL, PRODUCTION),
    device: str = "cpu",
) -> tuple[Section, list[OverheadResult]]:
    section = Section(
        "Worker overhead per step: a real worker vs the bare diffusers call",
        f"`bench/bench_worker.py`: redis-server + one `render worker` (RENDER_TORCH_THREADS={threads}), "
        "jobs submitted with `RenderClient`, vs `pipe(...)` with the same arguments in the benchmark process.",
    )
    set_threads(threads)
    registry = ModelRegistry.from_settings(WorkerSettings(device=device))
    pipe = registry.pipeline(model)
    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        port = free_port()
        env = {
            "RENDER_REDIS_URL": server.url,
            "RENDER_STORAGE_URL": (work / "out").as_uri(),
            "RENDER_DEVICE": device,
            "RENDER_TORCH_THREADS": str(threads),
            "RENDER_METRICS_PORT": str(port),  # the worker's own timing of its step hooks
        }
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        try:
            with WorkerProcess("overhead", env, work / "worker.log") as worker:
                worker.wait_ready(client.app)
                results = []
                for case in cases:
                    seconds, calls = hook_totals(metrics_url, model)
                    result = measure(client, pipe, model, case, repeats)
                    after_seconds, after_calls = hook_totals(metrics_url, model)
                    result.hook_seconds = (after_seconds - seconds) / max(1.0, after_calls - calls)
                    results.append(result)
        finally:
            client.close()
    report(results, model, threads, repeats, section)
    return section, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd15")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    run(model=args.model, repeats=args.repeats, threads=args.torch_threads)


if __name__ == "__main__":
    main()
