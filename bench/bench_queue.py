"""Benchmark the distributed path on this machine: revoke latency, queue overhead, 1 vs 2 workers.

Starts its own redis-server and `render worker` processes (tiny models, CPU, local storage) and
prints numbers and ratios measured in this one run:

    python bench/bench_queue.py [--revokes 5] [--overhead-jobs 20] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import redis  # noqa: E402

from producer import RenderSpec  # noqa: E402
from producer.client import RenderClient  # noqa: E402
from producer.keys import revoked_key  # noqa: E402
from producer.settings import ClientSettings  # noqa: E402
from worker.local_cluster import RedisServer, WorkerProcess  # noqa: E402
from worker.models.registry import ModelRegistry  # noqa: E402
from worker.render import render  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.storage import LocalStorage  # noqa: E402


def spec(steps: int, size: int, seed: int = 1) -> dict[str, Any]:
    return {
        "model": "tiny-sd15",
        "prompt": "a lighthouse",
        "num_inference_steps": steps,
        "width": size,
        "height": size,
        "seed": seed,
    }


def wait(client: RenderClient, task_id: str) -> Any:
    return client.wait(task_id, timeout=300, interval=0.005)


def revoke_latency(client: RenderClient, runs: int) -> None:
    steps_after, stop_ms, step_ms = [], [], []
    for i in range(runs):
        handle = client.submit(spec(150, 256, seed=i))
        for status in client.follow(handle.task_id, interval=0.01, timeout=120):
            if (status.step or 0) >= 5:
                break
        client.revoke(handle.task_id)
        manifest = wait(client, handle.task_id)
        assert manifest.status == "revoked", manifest.status
        steps_after.append(manifest.steps_after_revoke)
        stop_ms.append(manifest.timings.revoke_to_stop * 1e3)
        step_ms.append(manifest.timings.denoise / max(manifest.steps_completed, 1) * 1e3)
    print(f"\n## revoke latency ({runs} revokes of a running 150-step job)")
    print(f"steps completed after the revoke: {steps_after} (max {max(steps_after)})")
    print(
        f"revoke -> stop: median {statistics.median(stop_ms):.1f} ms, max {max(stop_ms):.1f} ms; "
        f"step time median {statistics.median(step_ms):.1f} ms "
        f"(latency = {statistics.median(stop_ms) / statistics.median(step_ms):.2f} steps)"
    )


def check_cost(redis_url: str, calls: int = 2000) -> None:
    client = redis.Redis.from_url(redis_url)
    key = revoked_key("bench")
    client.get(key)
    started = time.perf_counter()
    for _ in range(calls):
        client.get(key)
    micros = (time.perf_counter() - started) / calls * 1e6
    print(
        f"\n## per-step revocation check: GET on loopback Redis = {micros:.1f} µs "
        f"({micros / 1e3 / 50:.2%} of a 50 ms GPU step, {micros / 1e3 / 12:.2%} of a 12 ms tiny CPU step)"
    )


def queue_overhead(client: RenderClient, storage_dir: Path, jobs: int) -> None:
    one_step = spec(1, 64)
    registry = ModelRegistry.from_settings(WorkerSettings(device="cpu"))
    storage = LocalStorage(storage_dir / "inproc")
    parsed = RenderSpec.parse(one_step)
    render(parsed, registry=registry, storage=storage)  # warm
    wait(client, client.submit(one_step).task_id)  # warm the worker
    local, remote = [], []
    for _ in range(jobs):
        started = time.perf_counter()
        render(parsed, registry=registry, storage=storage)
        local.append(time.perf_counter() - started)
        started = time.perf_counter()
        wait(client, client.submit(one_step).task_id)
        remote.append(time.perf_counter() - started)
    lm, rm = statistics.median(local) * 1e3, statistics.median(remote) * 1e3
    print(f"\n## queue overhead ({jobs} one-step jobs, median; client polls every 5 ms)")
    print(
        f"render() in-process: {lm:.1f} ms; submit -> manifest through Redis and a worker: {rm:.1f} ms; "
        f"overhead {rm - lm:.1f} ms per job ({rm / lm:.1f}x)"
    )


def throughput(client: RenderClient, jobs: int, label: str) -> float:
    started = time.perf_counter()
    handles = client.submit_many([spec(30, 128, seed=i) for i in range(jobs)])
    for handle in handles:
        wait(client, handle.task_id)
    rate = jobs / (time.perf_counter() - started)
    print(f"{label}: {rate:.2f} jobs/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revokes", type=int, default=5)
    parser.add_argument("--overhead-jobs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=None, help="RENDER_TORCH_THREADS for each worker")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        env = {
            "RENDER_REDIS_URL": server.url,
            "RENDER_STORAGE_URL": (work / "out").as_uri(),
            "RENDER_DEVICE": "cpu",
            "RENDER_PROGRESS_INTERVAL": "0.05",
        }
        if args.torch_threads:
            env["RENDER_TORCH_THREADS"] = str(args.torch_threads)
        print(f"# bench_queue: cpus={os.cpu_count()} redis={server.url} (tiny-sd15, CPU)")
        check_cost(server.url)
        with WorkerProcess("one", env, work / "one.log") as first:
            first.wait_ready(client.app)
            revoke_latency(client, args.revokes)
            queue_overhead(client, work, args.overhead_jobs)
            print(f"\n## throughput ({args.batch} jobs of 30 steps at 128x128, submit_many)")
            one = throughput(client, args.batch, "1 worker")
            with WorkerProcess("two", env, work / "two.log") as second:
                second.wait_ready(client.app)
                two = throughput(client, args.batch, "2 workers")
        print(f"2 workers / 1 worker: {two / one:.2f}x (torch threads per worker: {args.torch_threads or 'default'})")
        client.close()


if __name__ == "__main__":
    main()
