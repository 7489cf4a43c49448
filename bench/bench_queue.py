"""Benchmark the distributed path on this machine: revoke latency, queue overhead, 1 vs 2 workers.

Starts its own redis-server and `render worker` processes (tiny-sd15, CPU, local-directory storage):
- the per-step revocation check: the worker's `RevocationCheck` step hook, kept by a `RevocationWatch`
  subscribed to the redis-server, 2,000 times (a flag read: no step asks Redis);
- revoke latency: a running 150-step job at 256x256 is revoked once it passes step 5, `--revokes`
  times; from each manifest's `steps_after_revoke` and `timings.revoke_to_stop`;
- queue overhead: one-step jobs through submit -> worker -> manifest against `render()` in this
  process, alternated, medians, and where a farm job's time goes (submit, pickup, render, back to the client);
- throughput: `--batch` jobs of 30 steps at 128x128 with `submit_many`, 1 worker and then 2.

    python bench/bench_queue.py [--revokes 5] [--overhead-jobs 20] [--batch 16] [--torch-threads 1]

`--torch-threads 0` leaves torch's default (every worker on every core).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common import Section, median, set_threads, verdict

from localfarm.cluster import RedisServer, WorkerProcess
from producer import RenderSpec
from producer.client import RenderClient
from producer.manifest import Manifest
from producer.settings import ClientSettings
from worker.engine.callbacks import StepInfo
from worker.engine.rendering import render
from worker.models.registry import ModelRegistry
from worker.process.jobcontrol import RevocationWatch, control_client
from worker.settings import WorkerSettings
from worker.storage import LocalStorage

MODEL = "tiny-sd15"


def spec(steps: int, size: int, seed: int = 1) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "a lighthouse",
        "num_inference_steps": steps,
        "width": size,
        "height": size,
        "seed": seed,
    }


def wait(client: RenderClient, task_id: str) -> Manifest:
    return client.wait(task_id, timeout=300, interval=0.005)


@dataclass
class QueueResults:
    check_micros: float
    steps_after_revoke: list[int]
    revoke_to_stop_ms: list[float]
    revoke_step_ms: list[float]
    local_ms: list[float]
    remote_ms: list[float]
    parts_ms: list[tuple[float, float, float, float]]  # submit, pickup, render, end -> client
    one_worker_rate: float
    two_worker_rate: float


def revoke_latency(client: RenderClient, runs: int) -> tuple[list[int], list[float], list[float]]:
    steps_after, stop_ms, step_ms = [], [], []
    for i in range(runs):
        handle = client.submit(spec(150, 256, seed=i))
        for status in client.follow(handle.task_id, interval=0.01, timeout=120):
            if (status.step or 0) >= 5:
                break
        client.revoke(handle.task_id)
        manifest = wait(client, handle.task_id)
        if manifest.status != "revoked" or manifest.steps_after_revoke is None:
            raise RuntimeError(f"revoked job ended {manifest.status}, steps after revoke {manifest.steps_after_revoke}")
        if manifest.timings.revoke_to_stop is None or manifest.timings.denoise is None:
            raise RuntimeError(f"revoked job's manifest lacks timings: {manifest.timings}")
        steps_after.append(manifest.steps_after_revoke)
        stop_ms.append(manifest.timings.revoke_to_stop * 1e3)
        step_ms.append(manifest.timings.denoise / max(manifest.steps_completed, 1) * 1e3)
    return steps_after, stop_ms, step_ms


def check_cost(redis_url: str, calls: int = 2000) -> float:
    watch = RevocationWatch(control_client(redis_url), "bench@localhost:1").start()
    check = watch.watch("bench")
    info = StepInfo("bench", 1, calls, 0.0)
    check.on_step(info)
    started = time.perf_counter()
    for _ in range(calls):
        check.on_step(info)
    watch.close()
    return (time.perf_counter() - started) / calls * 1e6


def queue_overhead(
    client: RenderClient, storage_dir: Path, jobs: int
) -> tuple[list[float], list[float], list[tuple[float, float, float, float]]]:
    """In-process and through-the-farm ms per one-step job; for each farm job, ms spent submitting, from submit
    to its render starting (pickup), rendering (as its manifest's clock says), and from its end to the client."""
    one_step = spec(1, 64)
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu"))
    storage = LocalStorage(storage_dir / "inproc")
    parsed = RenderSpec.parse(one_step)
    render(parsed, registry=registry, storage=storage)  # warm
    wait(client, client.submit(one_step).task_id)  # warm the worker
    local, remote, parts = [], [], []
    for _ in range(jobs):
        started = time.perf_counter()
        render(parsed, registry=registry, storage=storage)
        local.append((time.perf_counter() - started) * 1e3)
        started, sent_at = time.perf_counter(), time.time()
        handle = client.submit(one_step)
        submitted = time.perf_counter()
        manifest = wait(client, handle.task_id)
        remote.append((time.perf_counter() - started) * 1e3)
        began = datetime.fromisoformat(manifest.started_at).timestamp()
        ended = datetime.fromisoformat(manifest.finished_at).timestamp()
        woke = sent_at + (time.perf_counter() - started)
        parts.append(
            (
                (submitted - started) * 1e3,
                (began - sent_at) * 1e3 - (submitted - started) * 1e3,
                (ended - began) * 1e3,
                (woke - ended) * 1e3,
            )
        )
    return local, remote, parts


def throughput(client: RenderClient, jobs: int) -> float:
    started = time.perf_counter()
    handles = client.submit_many([spec(30, 128, seed=i) for i in range(jobs)])
    for handle in handles:
        wait(client, handle.task_id)
    return jobs / (time.perf_counter() - started)


def measure(*, revokes: int, overhead_jobs: int, batch: int, threads: int | None) -> QueueResults:
    if threads:
        set_threads(threads)  # the in-process render() of the queue-overhead comparison, like a worker
    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        env = {
            "RENDER_REDIS_URL": server.url,
            "RENDER_STORAGE_URL": (work / "out").as_uri(),
            "RENDER_DEVICE": "cpu",
            "RENDER_PROGRESS_INTERVAL": "0.05",
        }
        if threads:
            env["RENDER_TORCH_THREADS"] = str(threads)
        try:
            check = check_cost(server.url)
            with WorkerProcess("one", env, work / "one.log") as first:
                first.wait_ready(client.app)
                steps_after, stop_ms, step_ms = revoke_latency(client, revokes)
                local, remote, parts = queue_overhead(client, work, overhead_jobs)
                one = throughput(client, batch)
                with WorkerProcess("two", env, work / "two.log") as second:
                    second.wait_ready(client.app)
                    two = throughput(client, batch)
        finally:
            client.close()
    return QueueResults(check, steps_after, stop_ms, step_ms, local, remote, parts, one, two)


def report(r: QueueResults, *, revokes: int, overhead_jobs: int, batch: int, threads: int | None) -> list[Section]:
    revoke = Section(
        "Revocation: check cost and latency",
        f"`bench/bench_queue.py`: one `render worker` ({MODEL}, CPU, torch threads {threads or 'default'}); "
        f"{revokes} running 150-step 256x256 jobs revoked once past step 5.",
    )
    revoke.line(
        f"- per-step revocation check (a flag the worker's revocation watch keeps): {r.check_micros:.2f} µs "
        f"({r.check_micros / 1e3 / 50:.2%} of a 50 ms GPU step, {r.check_micros / 1e3 / 12:.2%} of a 12 ms tiny step)"
    )
    stop, step = median(r.revoke_to_stop_ms), median(r.revoke_step_ms)
    worst = max(r.steps_after_revoke)
    revoke.line(f"- steps completed after the revoke: {r.steps_after_revoke} (max {worst})")
    revoke.line(
        f"- revoke -> stop: median {stop:.1f} ms, max {max(r.revoke_to_stop_ms):.1f} ms; step time median "
        f"{step:.1f} ms; latency = {stop / step:.2f} steps (median), {max(r.revoke_to_stop_ms) / step:.2f} (max)"
    )
    revoke.line(f"- target: at most one step after the revoke: {verdict(worst <= 1)}")

    queue = Section(
        "Queue overhead and throughput",
        f"`bench/bench_queue.py`: one-step 64x64 jobs, {overhead_jobs} of each, alternated; throughput: {batch} jobs "
        f"of 30 steps at 128x128 with `submit_many`; torch threads per worker: {threads or 'default'}.",
    )
    lm, rm = median(r.local_ms), median(r.remote_ms)
    queue.line(
        f"- render() in-process: {lm:.1f} ms; submit -> manifest through Redis and a worker: {rm:.1f} ms; "
        f"overhead {rm - lm:.1f} ms per job ({rm / lm:.2f}x); target at most 5 ms: {verdict(rm - lm <= 5)}"
    )
    submit, pickup, rendering, tail = (median(column) for column in zip(*r.parts_ms, strict=True))
    queue.line(
        f"- where a farm job's time goes (medians): submit {submit:.1f} ms, submit -> render starts {pickup:.1f} ms "
        f"(delivery, the job thread's checks, lease, job record, the GPU thread taking it), render {rendering:.1f} ms, "
        f"render ends -> client has the manifest {tail:.1f} ms (manifest and result writes, the publish that wakes "
        "`wait`, its reads)"
    )
    queue.line(
        "- `wait`/`follow` wake on the result backend's publish of each state change (no polling delay); what "
        "remains is the worker's per-job Redis round trips on both sides of the render; in a stream they overlap the "
        "next job's denoising (bench_throughput.py)"
    )
    queue.line(f"- 1 worker: {r.one_worker_rate:.2f} jobs/s")
    queue.line(f"- 2 workers: {r.two_worker_rate:.2f} jobs/s")
    queue.line(f"- 2 workers / 1 worker: {r.two_worker_rate / r.one_worker_rate:.2f}x on {os.cpu_count()} cores")
    return [revoke, queue]


def run(
    *, revokes: int = 5, overhead_jobs: int = 20, batch: int = 16, threads: int | None = 1
) -> tuple[list[Section], QueueResults]:
    results = measure(revokes=revokes, overhead_jobs=overhead_jobs, batch=batch, threads=threads)
    return report(results, revokes=revokes, overhead_jobs=overhead_jobs, batch=batch, threads=threads), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revokes", type=int, default=5)
    parser.add_argument("--overhead-jobs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1, help="RENDER_TORCH_THREADS per worker; 0: default")
    args = parser.parse_args()
    run(revokes=args.revokes, overhead_jobs=args.overhead_jobs, batch=args.batch, threads=args.torch_threads or None)


if __name__ == "__main__":
    main()
