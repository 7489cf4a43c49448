"""Benchmark throughput: images/s of a stream of same-shape jobs through a real worker, against bare diffusers.

Per case (a size and step count), each round runs, interleaved:
- bare serial: `pipe(...)` once per spec, in a row (the arguments `render()` passes), in a fresh process of its
  own, as the worker is (`BareProcess` says why);
- bare batched: the same specs as one `pipe(...)` call per `--max-batch` prompts, each with its own generator
  (the limit micro-batching can reach);
- worker: the same specs submitted at once with `RenderClient.submit_many` to one `render worker`
  (RENDER_MAX_BATCH=1 at the production-like case, `--max-batch` at the small one), timed from the submit to
  the last job's final state: queueing, input handling, PNG encoding, storage and manifests included.

Both sides use one torch thread. The last line compares the worker with the bare serial loop:
`overlap` at the production-like case (what overlapping a job's I/O with the next one's denoising can win),
`batched` at the small case (what batching compatible jobs can win).

A farm's stream is its backlog. Two costs come once per stream, not per call: the wait for the first call's
jobs to be delivered and checked (about 30 ms of Celery delivering one message every 2-3 ms), and the tail, the
last call's PNG encoding, storage and manifests, which no next call overlaps (about 80 ms for 8 images at 256²).
The batched stream is six calls' worth (`--batch-jobs`, default 6 x max-batch): they weigh half what they did in
the three calls' worth it used to be (~2 % of the stream instead of ~4 %), nearer a backlog's, and a round stays
under half a minute. The case is cheap, so it runs `--batch-repeats` (6) rounds against the noise of a shared
2-core machine (a multiple of three: `common.interleaved` puts each of the three contestants in each place of a
round equally often).

The output ends with the `throughput: ...` line.

    python bench/bench_throughput.py [--quick] [--jobs 8] [--max-batch 8] [--batch-jobs N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_worker import Case
from common import PROMPT, Section, interleaved, median, set_threads, spread

from localfarm.cluster import RedisServer, WorkerProcess
from producer import RenderSpec
from producer.client import RenderClient
from producer.settings import ClientSettings
from worker.engine.rendering import pipeline_arguments
from worker.models.registry import ModelRegistry
from worker.settings import WorkerSettings

MODEL = "tiny-sd15"


SMALL = Case("small", 256, 20)
PRODUCTION = Case("production-like", 640, 20)


def specs(case: Case, jobs: int, model: str = MODEL) -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "prompt": f"{PROMPT}, variation {i}",
            "num_inference_steps": case.steps,
            "width": case.size,
            "height": case.size,
            "seed": 1000 + i,
        }
        for i in range(jobs)
    ]


def bare_serial(pipe: Any, parsed: list[RenderSpec]) -> None:
    with torch.inference_mode():
        for spec in parsed:
            pipe(**pipeline_arguments(spec, {}, [spec.seed or 0]))


def bare_batched(pipe: Any, parsed: list[RenderSpec], max_batch: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(parsed), max_batch):
            chunk = parsed[start : start + max_batch]
            arguments = pipeline_arguments(chunk[0], {}, [spec.seed or 0 for spec in chunk])
            arguments["prompt"] = [spec.prompt for spec in chunk]
            arguments["negative_prompt"] = None
            pipe(**arguments)


def through_worker(client: RenderClient, raw: list[dict[str, Any]]) -> float:
    """Seconds from the submit of `raw` to the last job's final state."""
    started = time.perf_counter()
    handles = client.submit_many(raw)
    for handle in handles:  # block on the result backend's pub/sub: polling would take CPU from the worker
        client.app.AsyncResult(handle.task_id).get(timeout=900, propagate=False)
    elapsed = time.perf_counter() - started
    for handle in handles:
        manifest = handle.wait(timeout=60)
        if manifest.status != "succeeded":
            raise RuntimeError(f"worker job ended {manifest.status}: {manifest.error}")
    return elapsed


class BareProcess:
    """The bare loops, run in a fresh process of their own as the worker is.

    A process that has already rendered a lot runs the same pipeline faster than a fresh one: its allocator
    has grown and stopped handing memory back (the same loop at 640² took 5 % less with glibc's trimming
    turned off, `MALLOC_TRIM_THRESHOLD_`; in `make bench`, after the other benchmarks, the bare loop in the
    benchmark's own process ran 5.5 % faster than in a fresh one). Timing the bare loops in the long-lived
    benchmark process against a fresh worker measured that, not the worker.
    """

    def __init__(self, device: str, model: str) -> None:
        context = multiprocessing.get_context("spawn")  # fresh: no state of this process, CUDA-safe
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_bare_loop, args=(child, device, model), daemon=True)
        self.process.start()
        self._answer()  # the pipeline is loaded

    def run(self, how: str, case: Case, jobs: int, max_batch: int, model: str) -> float:
        self.connection.send((how, case, jobs, max_batch, model))
        return float(self._answer())

    def _answer(self) -> Any:
        if not self.connection.poll(900):
            raise RuntimeError("the bare benchmark process did not answer in 15 minutes")
        answer = self.connection.recv()
        if isinstance(answer, BaseException):
            raise RuntimeError("the bare benchmark process failed") from answer
        return answer

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=60)


def _bare_loop(connection: Any, device: str, model: str) -> None:
    try:
        set_threads(1)
        pipe = ModelRegistry.from_settings(WorkerSettings(device=device)).pipeline(model)
        connection.send("ready")
    except Exception as exc:
        connection.send(exc)
        return
    while (request := connection.recv()) is not None:
        how, case, jobs, max_batch, spec_model = request
        try:
            parsed = [RenderSpec.parse(spec) for spec in specs(case, jobs, spec_model)]
            started = time.perf_counter()
            if how == "serial":
                bare_serial(pipe, parsed)
            else:
                bare_batched(pipe, parsed, max_batch)
            connection.send(time.perf_counter() - started)
        except Exception as exc:
            connection.send(exc)


@dataclass
class Throughput:
    case: Case
    jobs: int
    seconds: dict[str, list[float]]

    def rate(self, name: str) -> float:
        return self.jobs / median(self.seconds[name])

    def ratio(self, name: str) -> float:
        return self.rate(name) / self.rate("bare serial")


def measure(
    client: RenderClient, bare: BareProcess, case: Case, jobs: int, max_batch: int, repeats: int, model: str = MODEL
) -> Throughput:
    raw = specs(case, jobs, model)
    seconds = interleaved(
        {
            "bare serial": lambda: bare.run("serial", case, jobs, max_batch, model),
            "bare batched": lambda: bare.run("batched", case, jobs, max_batch, model),
            "worker": lambda: through_worker(client, raw),
        },
        repeats,
        self_timed=True,
    )
    return Throughput(case, jobs, seconds)


def _worker_env(server: RedisServer, work: Path, device: str, max_batch: int, prefetch: int) -> dict[str, str]:
    return {
        "RENDER_REDIS_URL": server.url,
        "RENDER_STORAGE_URL": (work / "out").as_uri(),
        "RENDER_DEVICE": device,
        "RENDER_TORCH_THREADS": "1",
        "RENDER_MAX_BATCH": str(max_batch),
        "RENDER_PREFETCH": str(prefetch),
    }


def run(
    *,
    jobs: int = 8,
    batch_jobs: int | None = None,
    max_batch: int = 8,
    repeats: int = 3,
    batch_repeats: int | None = None,
    device: str = "cpu",
    model: str = MODEL,
    overlap_case: Case = PRODUCTION,
    batch_case: Case = SMALL,
) -> tuple[Section, str]:
    """Overlap at `overlap_case` (RENDER_MAX_BATCH=1, `jobs` per stream), overlap and batching at `batch_case`
    (`batch_jobs` per stream, default six calls' worth, `batch_repeats` rounds, default 6 or `repeats` if more);
    the section and the closing `throughput: ...` line."""
    batch_jobs = batch_jobs or 6 * max_batch
    batch_repeats = batch_repeats or max(6, repeats)
    section = Section(
        "Throughput: a stream of jobs through a worker vs bare diffusers",
        f"`bench/bench_throughput.py`: streams of same-shape {model} jobs ({jobs} at the production-like size, "
        f"{batch_jobs} at the small one), submitted at once, one torch thread on both sides. The worker is timed "
        "from the submit to the last job's final state (queueing, PNG encoding, storage and manifests included): "
        "at the production-like size with RENDER_MAX_BATCH=1 "
        f"(overlap alone: one job in hand beyond the one denoising), at the small size with RENDER_MAX_BATCH="
        f"{max_batch} (overlap and batching). Bare: the serial `pipe()` loop over the same specs, and calls of up to "
        f"{max_batch} prompts (the limit), in a fresh process of their own as the worker is (a long-lived process "
        f"renders faster: its allocator has grown). Medians of {repeats} interleaved rounds after a warm-up "
        f"({batch_repeats} at the small size); ± = half the IQR.",
    )
    bare = BareProcess(device, model)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    results = {}
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        try:
            workers = (
                ("overlap", overlap_case, jobs, 1, 1, repeats),
                ("batched", batch_case, batch_jobs, max_batch, max_batch, batch_repeats),
            )
            for name, case, count, batch, prefetch, rounds in workers:
                env = _worker_env(server, work, device, batch, prefetch)
                with WorkerProcess(f"throughput-{name}", env, work / f"worker-{name}.log") as worker:
                    worker.wait_ready(client.app)
                    results[name] = measure(client, bare, case, count, max_batch, rounds, model)
        finally:
            client.close()
            bare.close()
    rows = []
    for result in results.values():
        for name in ("bare serial", "bare batched", "worker"):
            rows.append(
                [
                    f"{result.case.label} {result.case.size}², {result.case.steps} steps, {result.jobs} jobs",
                    name,
                    f"{median(result.seconds[name]):.2f} (±{spread(result.seconds[name]):.1%})",
                    f"{result.rate(name):.2f}",
                    f"{result.ratio(name):.2f}x",
                ]
            )
    section.table(["case", "how", "s per stream", "jobs/s", "of bare serial"], rows)
    small, production = results["batched"], results["overlap"]
    line = f"throughput: overlap {production.ratio('worker'):.2f}x, batched {small.ratio('worker'):.2f}x of bare serial"
    section.line(
        f"- goals (2-core CPU, tiny-sd15): overlap ≥ 1.00x at {production.case.size}² "
        f"(**{'met' if production.ratio('worker') >= 1.0 else 'NOT met'}**), batched ≥ 1.40x at {small.case.size}² "
        f"(**{'met' if small.ratio('worker') >= 1.4 else 'NOT met'}**); the limit, bare batched calls: "
        f"{small.ratio('bare batched'):.2f}x at {small.case.size}², {production.ratio('bare batched'):.2f}x at "
        f"{production.case.size}²"
    )
    section.line(line)
    return section, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="one round after the warm-up; 2 jobs at 640², 8 at 256² (under 2 minutes)"
    )
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-jobs", type=int, default=None, help="jobs per small stream (default: 6 x max-batch)")
    parser.add_argument("--batch-repeats", type=int, default=6, help="rounds at the small size")
    args = parser.parse_args()
    if args.quick:
        run(jobs=2, batch_jobs=8, max_batch=min(args.max_batch, 4), repeats=1, batch_repeats=1)
    else:
        run(jobs=args.jobs, batch_jobs=args.batch_jobs, max_batch=args.max_batch, batch_repeats=args.batch_repeats)


if __name__ == "__main__":
    main()
