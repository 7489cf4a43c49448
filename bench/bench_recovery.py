"""Benchmark: time from SIGKILL of a worker mid-job to that job's completion on the other worker.

Starts a redis-server and two `render worker` processes per setting, kills the one rendering a
150-step job after step 5, and reports how long the job took to finish elsewhere:

    python bench/bench_recovery.py
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from producer.client import RenderClient  # noqa: E402
from producer.keys import RUNNING_TASKS  # noqa: E402
from producer.settings import ClientSettings  # noqa: E402
from worker.local_cluster import RedisServer, WorkerProcess  # noqa: E402

SETTINGS = [("2", "0.5"), ("30", "10")]  # (RENDER_LEASE_TTL, RENDER_RECOVERY_INTERVAL); the second is the default


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        print(f"# bench_recovery: cpus={os.cpu_count()} (tiny-sd15, CPU, 150 steps at 256x256)")
        for ttl, interval in SETTINGS:
            env = {
                "RENDER_REDIS_URL": server.url,
                "RENDER_STORAGE_URL": (work / "out").as_uri(),
                "RENDER_DEVICE": "cpu",
                "RENDER_TORCH_THREADS": "1",
                "RENDER_LEASE_TTL": ttl,
                "RENDER_RECOVERY_INTERVAL": interval,
            }
            workers = [WorkerProcess(f"w{i}-{ttl}", env, work / f"w{i}-{ttl}.log").start() for i in range(2)]
            try:
                for worker in workers:
                    worker.wait_ready(client.app)
                handle = client.submit(
                    {
                        "model": "tiny-sd15",
                        "prompt": "p",
                        "num_inference_steps": 150,
                        "width": 256,
                        "height": 256,
                        "seed": 1,
                    }
                )
                for status in client.follow(handle.task_id, interval=0.01, timeout=120):
                    if (status.step or 0) >= 5:
                        break
                record = json.loads(client.redis.hget(RUNNING_TASKS, handle.task_id) or "{}")
                victim = next(w for w in workers if record["worker"].startswith(w.hostname + ":"))
                victim.kill(signal.SIGKILL)
                killed = time.monotonic()
                manifest = client.wait(handle.task_id, timeout=180, interval=0.01)
                took = time.monotonic() - killed
                print(
                    f"lease_ttl={ttl} s, recovery_interval={interval} s: {manifest.status} as attempt "
                    f"{manifest.attempt}, {took:.1f} s after the kill (of which rendering: "
                    f"{manifest.timings.denoise:.1f} s)"
                )
            finally:
                for worker in workers:
                    worker.stop()
        client.close()


if __name__ == "__main__":
    main()
