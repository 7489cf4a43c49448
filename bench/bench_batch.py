"""Benchmark submitting a big batch: `render batch FILE --detach` with 2,000 one-step specs.

Starts its own redis-server (no worker: `--queue-anyway`), writes a JSONL file of `--jobs` specs, and times
the real command as a process, end to end (interpreter start and imports included), then again for the
same file: the resume path, which reads every job's status and submits nothing. Also the in-process time of
`RenderClient.submit_batch` alone, and the Redis commands one submission costs (INFO commandstats).

    python bench/bench_batch.py [--jobs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from common import Section

from localfarm.cluster import RedisServer
from producer.client import RenderClient
from producer.keys import model_queue, priority_lists
from producer.settings import ClientSettings

ROOT = Path(__file__).resolve().parent.parent


def write_specs(path: Path, jobs: int) -> None:
    lines = (
        json.dumps({"model": "tiny-sd15", "prompt": f"bench {i}", "num_inference_steps": 1, "seed": i})
        for i in range(jobs)
    )
    path.write_text("\n".join(lines) + "\n")


def timed_cli(server: RedisServer, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", *args, "--detach", "--queue-anyway"],
        cwd=ROOT,
        env={**os.environ, "RENDER_REDIS_URL": server.url},
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"render batch failed: {done.stderr}")
    return elapsed, done.stdout.splitlines()[0]


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(value["calls"]) for value in stats.values())


def run(jobs: int = 2000) -> Section:
    section = Section("Batch submission")
    section.line(
        f"`render batch FILE --detach` with {jobs} one-step specs, against a private redis-server on loopback "
        "(no worker; the jobs stay queued). Process wall time, interpreter start and imports included."
    )
    with tempfile.TemporaryDirectory() as tmp, RedisServer(workdir=Path(tmp)) as server:
        path = Path(tmp) / "bench.jsonl"
        write_specs(path, jobs)
        first, summary = timed_cli(server, str(path), "--name", "bench-cli")
        again, resumed = timed_cli(server, str(path), "--name", "bench-cli")
        direct = redis.Redis.from_url(server.url)
        queued = sum(direct.llen(name) for name in priority_lists(model_queue("render", "tiny-sd15")).values())
        section.line(f"- first run: **{first:.2f} s**, {jobs / first:.0f} jobs/s ({summary})")
        section.line(f"- same command again (resume: every status read, nothing sent): {again:.2f} s ({resumed})")
        section.line(f"- jobs queued afterwards: {queued} (each exactly once)")

        client = RenderClient(ClientSettings(redis_url=server.url))
        lines = path.read_text().splitlines()
        before = commands(direct)
        started = time.perf_counter()
        client.submit_batch(lines, name="bench-api", wait_for_worker=True)
        inside = time.perf_counter() - started
        spent = commands(direct) - before
        section.line(
            f"- `RenderClient.submit_batch` alone, in process: {inside:.2f} s, {jobs / inside:.0f} jobs/s; "
            f"{spent} Redis commands in all ({spent / jobs:.1f} per job, pipelined in chunks of 500)"
        )
        client.close()
        direct.close()
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    print(run(args.jobs).markdown())


if __name__ == "__main__":
    main()
