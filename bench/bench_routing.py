"""Benchmark reload thrash: jobs alternating between two models on workers that serve both, one model cached.

Starts its own redis-server and two `render worker` processes per variant (both tiny models allowlisted,
RENDER_MAX_CACHED_MODELS=1, one torch thread each) and submits `--jobs` one-step jobs alternating
tiny-sd15 / tiny-sdxl, all at once, then counts the pipeline loads each worker advertises:
- before: every job on the one bare queue (the layout before per-model routing), so a worker takes
  whatever comes next and reloads on almost every job;
- after: routed to the models' queues, each worker polling its loaded model's queue first.
Then the switch bound: how long a low job, and another model's job, wait on one worker serving both models
while normal jobs for its loaded model keep arriving.

    python bench/bench_routing.py [--jobs 100]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import Section

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import RenderClient
from producer.fleet import live_workers
from producer.keys import model_queue, priority_lists
from producer.settings import ClientSettings

MODELS = ["tiny-sd15", "tiny-sdxl"]


def spec(model: str, seed: int, steps: int = 1) -> dict[str, Any]:
    return {"model": model, "prompt": "x", "num_inference_steps": steps, "width": 64, "height": 64, "seed": seed}


def worker_env(server: RedisServer, storage_dir: str, **extra: str) -> dict[str, str]:
    """Both tiny models, CPU, one torch thread, results in `storage_dir`."""
    return {
        "RENDER_REDIS_URL": server.url,
        "RENDER_STORAGE_URL": Path(storage_dir).as_uri(),
        "RENDER_DEVICE": "cpu",
        "RENDER_TORCH_THREADS": "1",
        **extra,
    }


def loads_for(jobs: int, *, routed: bool) -> tuple[int, float]:
    """Pipeline loads over both workers, and the seconds the batch took, for one variant on fresh workers."""
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp, RedisServer() as server:
        env = worker_env(server, tmp, RENDER_MAX_CACHED_MODELS="1")
        workers = [WorkerProcess(name, env, Path(tmp) / f"{name}.log").start() for name in ("left", "right")]
        client = RenderClient(ClientSettings(redis_url=server.url))
        try:
            for worker in workers:
                worker.wait_ready(client.app, timeout=120)
            specs = [spec(MODELS[i % 2], i) for i in range(jobs)]
            started = time.perf_counter()
            handles = client.submit_many(specs, queue=None if routed else client.settings.queue)
            manifests = [client.wait(h.task_id, timeout=600, interval=0.02) for h in handles]
            elapsed = time.perf_counter() - started
            assert all(m.status == "succeeded" for m in manifests), [m.error for m in manifests if m.error]
            # Each worker writes its load counts when a job ends, before the job's result: all are in by now.
            loads = sum(sum(w.loads.values()) for w in live_workers(client.redis))
        finally:
            client.close()
            for worker in workers:
                worker.stop()
    return loads, elapsed


def switch_waits(switch_after: float) -> tuple[float, float, int]:
    """Queue waits of a low job and of another model's job while normal jobs keep arriving for the loaded model.

    One worker serving both models; a producer keeps tiny-sd15's normal queue at least three jobs deep.
    Returns the two waits and how many normal jobs were still queued when both had run.
    """
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp, RedisServer() as server:
        env = worker_env(server, tmp, RENDER_SWITCH_AFTER_SECONDS=str(switch_after))
        worker = WorkerProcess("fair", env, Path(tmp) / "fair.log").start()
        client = RenderClient(ClientSettings(redis_url=server.url))
        normal = priority_lists(model_queue(client.settings.queue, MODELS[0]))["normal"]
        stop = threading.Event()

        def feed() -> None:
            seed = 0
            while not stop.is_set():
                if client.redis.llen(normal) < 3:
                    client.submit_many([spec(MODELS[0], seed + i, steps=4) for i in range(5)])
                    seed += 5
                stop.wait(0.02)

        feeder = threading.Thread(target=feed, daemon=True)
        try:
            worker.wait_ready(client.app, timeout=120)
            feeder.start()
            time.sleep(switch_after)  # the stream is established and the worker has sd15 loaded
            low = client.submit(spec(MODELS[0], 10_000), priority="low")
            other = client.submit(spec(MODELS[1], 10_001))
            waits = [client.wait(h.task_id, timeout=300).timings.queue_wait or 0.0 for h in (low, other)]
            still_queued = int(client.redis.llen(normal))
        finally:
            stop.set()
            feeder.join(timeout=30)
            client.close()
            worker.stop()
    return waits[0], waits[1], still_queued


def run(jobs: int = 100, switch_after: float = 2.0) -> Section:
    section = Section(
        "Reload thrash: two models over two workers that serve both",
        f"`bench/bench_routing.py`: {jobs} one-step 64x64 jobs alternating {' / '.join(MODELS)}, submitted at "
        "once to 2 workers that both allowlist both models with RENDER_MAX_CACHED_MODELS=1; pipeline loads "
        "as the workers advertise them (`render workers`).",
    )
    before, before_s = loads_for(jobs, routed=False)
    after, after_s = loads_for(jobs, routed=True)
    section.table(
        ["layout", "pipeline loads", "batch seconds"],
        [
            ["one queue (before routing)", before, f"{before_s:.1f}"],
            ["per-model queues, loaded model first", after, f"{after_s:.1f}"],
        ],
    )
    section.line(f"- routing: {before} loads before, {after} after (goal: at most 4)")
    low, other, queued = switch_waits(switch_after)
    section.line(
        f"- the bound, RENDER_SWITCH_AFTER_SECONDS={switch_after:g} with normal tiny-sd15 jobs arriving nonstop on "
        f"one worker serving both models: a low job waited {low:.2f} s, a tiny-sdxl job {other:.2f} s "
        f"(bound: {switch_after:g} s + a check every {max(0.25, min(switch_after / 4, 5.0)):g} s + the job in "
        f"hand); {queued} normal jobs were still queued"
    )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    run(parser.parse_args().jobs)


if __name__ == "__main__":
    main()
