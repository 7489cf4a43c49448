"""Benchmark: time from SIGKILL of a worker mid-job to that job's completion on the other worker.

Starts a redis-server and two `render worker` processes per setting, kills (whole process group)
the one rendering a 150-step 256x256 tiny-sd15 job after step 5, and reports how long the job took
to finish elsewhere, from the kill to its manifest:

    python bench/bench_recovery.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import Section

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import RenderClient
from producer.keys import RUNNING_TASKS
from producer.settings import ClientSettings

# (RENDER_LEASE_TTL, RENDER_RECOVERY_INTERVAL); the second pair is the default.
SETTINGS = (("2", "0.5"), ("30", "10"))


@dataclass
class Recovery:
    lease_ttl: str
    interval: str
    status: str
    attempt: int
    seconds: float
    rendering: float


def recover_once(client: RenderClient, server: RedisServer, work: Path, ttl: str, interval: str) -> Recovery:
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
            {"model": "tiny-sd15", "prompt": "p", "num_inference_steps": 150, "width": 256, "height": 256, "seed": 1}
        )
        for status in client.follow(handle.task_id, interval=0.01, timeout=120):
            if (status.step or 0) >= 5:
                break
        record = json.loads(client.redis.hget(RUNNING_TASKS, handle.task_id) or "{}")
        if "worker" not in record:
            raise RuntimeError(f"task {handle.task_id} is not in {RUNNING_TASKS} while it renders: {record}")
        victim = next(w for w in workers if record["worker"].startswith(w.hostname + ":"))
        victim.kill(signal.SIGKILL)
        killed = time.monotonic()
        manifest = client.wait(handle.task_id, timeout=180, interval=0.01)
        took = time.monotonic() - killed
    finally:
        for worker in workers:
            worker.stop()
    return Recovery(ttl, interval, manifest.status, manifest.attempt, took, manifest.timings.denoise or 0.0)


def run(settings: tuple[tuple[str, str], ...] = SETTINGS) -> tuple[Section, list[Recovery]]:
    section = Section(
        "Recovery after a SIGKILL",
        "`bench/bench_recovery.py`: two workers (torch threads 1); the one rendering a 150-step 256x256 job is "
        "SIGKILLed (whole process group) after step 5; the clock runs from the kill to the job's manifest.",
    )
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    results = []
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        try:
            for ttl, interval in settings:
                r = recover_once(client, server, work, ttl, interval)
                results.append(r)
                section.line(
                    f"- lease_ttl={r.lease_ttl} s, recovery_interval={r.interval} s: {r.status} as attempt "
                    f"{r.attempt}, {r.seconds:.1f} s after the kill (of which rendering: {r.rendering:.1f} s; "
                    f"bound: lease + one scan = {float(r.lease_ttl) + float(r.interval):g} s + rendering)"
                )
        finally:
            client.close()
    section.line(f"- {os.cpu_count()} cores; default settings are the last line")
    return section, results


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    run()


if __name__ == "__main__":
    main()
