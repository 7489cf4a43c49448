"""Benchmark the HTTP job API (`render serve`): the latency it adds to a job, and the reads per second it answers.

Against a private redis-server, one tiny `render worker` (RENDER_MAX_BATCH=1, one torch thread) and the service as
`render serve` runs it (its own process, uvicorn with its access log, no API key, loopback):

- added latency per job: the same small tiny-sd15 job from submit to its final state, interleaved, through
  - the library: `RenderClient.submit` then `RenderClient.wait` (it wakes on the result backend's pub/sub);
  - HTTP + SSE: `POST /v1/jobs`, then `GET /v1/jobs/{id}/events` read until the stream ends with the final state
    (the service reads the job every `service.events.POLL` s per open stream: half that is the expected cost);
  - HTTP + wait: one `POST /v1/jobs` with `Prefer: wait=60`, answered once the job is final;
  the difference of the medians is what the service adds;
- reads: `GET /v1/jobs/{id}` of a finished job (the Job JSON: status, manifest, file links) per second, one
  client thread in a row on one keep-alive connection, then N threads at once (a connection each), and
  `GET /healthz` (touches nothing) in a row, the framework's own floor. The client threads run in this process on
  the same cores as the service, so the figures are this machine's, client included.

    python bench/bench_http.py [--quick] [--rounds 9] [--threads 4,16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import PROMPT, Section, interleaved, median, spread

from localfarm.cluster import RedisServer, WorkerProcess, free_port, stop_process, wait_until
from producer.client import RenderClient
from producer.settings import ClientSettings
from service.events import POLL

MODEL = "tiny-sd15"
SIZE, STEPS = 128, 4


def job_spec(seed: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "num_inference_steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "seed": seed,
    }


class ServiceProcess:
    """`render serve` on a free loopback port, in its own process group, as an operator would run it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        command = [sys.executable, "-m", "worker.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

        def answers() -> bool:
            try:
                return request(self.port, "GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=60, what="render serve", process=self.process, log=self.log_path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process(self.process)
        if self._log is not None:
            self._log.close()


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, Any]:
    """One request (on `connection`, kept open, or a new one); the status and the JSON answer."""
    own = connection is None
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
    finally:
        if own:
            conn.close()
    return response.status, json.loads(raw) if raw else None


def _submitted(port: int, spec: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, job = request(port, "POST", "/v1/jobs", spec, headers)
    if status not in (200, 201):
        raise RuntimeError(f"POST /v1/jobs answered {status}: {job}")
    return dict(job)


def _check(job: dict[str, Any], how: str) -> None:
    if job.get("status") != "succeeded":
        raise RuntimeError(f"{how}: the job ended {job.get('status')}: {job.get('error')}")


def through_sse(port: int, spec: dict[str, Any]) -> None:
    """POST the job, then follow its event stream until the server ends it after the final state."""
    task_id = _submitted(port, spec)["id"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    last: dict[str, Any] = {}
    try:
        conn.request("GET", f"/v1/jobs/{task_id}/events")
        response = conn.getresponse()
        for raw in response:  # line by line as the server flushes them; the stream ends after the final state
            line = raw.decode()
            if line.startswith("data: "):
                last = json.loads(line[6:])
    finally:
        conn.close()
    _check(last, "HTTP + SSE")


def through_wait(port: int, spec: dict[str, Any]) -> None:
    _check(_submitted(port, spec, {"Prefer": "wait=60"}), "HTTP + Prefer: wait")


def through_library(client: RenderClient, spec: dict[str, Any]) -> None:
    manifest = client.wait(client.submit(spec).task_id, timeout=120)
    if manifest.status != "succeeded":
        raise RuntimeError(f"library: the job ended {manifest.status}: {manifest.error}")


def latency(client: RenderClient, port: int, rounds: int) -> dict[str, list[float]]:
    seeds = iter(range(1, 1_000_000))
    return interleaved(
        {
            "library": lambda: through_library(client, job_spec(next(seeds))),
            "HTTP + SSE": lambda: through_sse(port, job_spec(next(seeds))),
            "HTTP + Prefer: wait": lambda: through_wait(port, job_spec(next(seeds))),
        },
        rounds,
    )


def reads_per_second(port: int, path: str, threads: int, seconds: float) -> float:
    """Answers per second of `GET path` from `threads` threads, each on its own keep-alive connection."""
    counts = [0] * threads
    errors: list[str] = []
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            start.wait()
            while time.perf_counter() < deadline[0]:
                status, _ = request(port, "GET", path, connection=conn)
                if status != 200:
                    errors.append(f"GET {path} answered {status}")
                    return
                counts[index] += 1
        finally:
            conn.close()

    pool = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in pool:
        thread.join(timeout=seconds + 60)
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(errors[0])
    return sum(counts) / elapsed


@dataclass
class Reads:
    label: str
    threads: int
    rates: list[float]


def reads(port: int, task_id: str, threads: Sequence[int], rounds: int, seconds: float) -> list[Reads]:
    cases = [("GET /v1/jobs/{id}", f"/v1/jobs/{task_id}", n) for n in (1, *threads)]
    cases.append(("GET /healthz", "/healthz", 1))
    rates = interleaved(
        {
            f"{label} x{n}": (lambda path=path, n=n: reads_per_second(port, path, n, seconds))
            for label, path, n in cases
        },
        rounds,
        self_timed=True,  # each case returns its rate; `interleaved` only orders the rounds
    )
    return [Reads(label, n, rates[f"{label} x{n}"]) for label, _, n in cases]


def run(
    *, rounds: int = 9, threads: Sequence[int] = (4, 16), read_seconds: float = 2.0, device: str = "cpu"
) -> Section:
    """Added latency (`rounds` interleaved jobs per way, a multiple of 3) and reads per second; the section."""
    section = Section(
        "HTTP service: added latency per job and reads per second",
        f"`bench/bench_http.py`: one `render worker` (RENDER_MAX_BATCH=1, one torch thread) and `render serve` "
        f"(its own process, uvicorn, access log on, no API key) over a private redis-server. Latency: the same "
        f"{MODEL} job ({SIZE}², {STEPS} steps) from submit to its final state, through the library "
        "(`RenderClient.submit` + `wait`, woken by the result backend's pub/sub), through HTTP (`POST /v1/jobs`, "
        f"then the job's SSE stream to its end; the service reads the job every {POLL:g} s per stream), and "
        "through one `POST` with `Prefer: wait=60`; medians of "
        f"{rounds} interleaved rounds after a warm-up, ± = half the IQR. Reads: `GET /v1/jobs/{{id}}` of a "
        f"finished job for {read_seconds:g} s per case, one client thread on a keep-alive connection, then "
        "threads at once (a connection each), and `GET /healthz` (touches nothing); client threads in the "
        f"benchmark's process on the same {os.cpu_count()} cores; medians of {rounds} interleaved rounds.",
    )
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    storage = (work / "out").as_uri()
    with RedisServer(workdir=work) as server:
        client = RenderClient(ClientSettings(redis_url=server.url))
        env = {
            "RENDER_REDIS_URL": server.url,
            "RENDER_STORAGE_URL": storage,
            "RENDER_DEVICE": device,
            "RENDER_TORCH_THREADS": "1",
            "RENDER_MAX_BATCH": "1",
        }
        try:
            with (
                WorkerProcess("http-bench", env, work / "worker.log") as worker,
                ServiceProcess(
                    {"RENDER_REDIS_URL": server.url, "RENDER_STORAGE_URL": storage}, work / "serve.log"
                ) as service,
            ):
                worker.wait_ready(client.app)
                seconds = latency(client, service.port, rounds)
                finished = client.submit(job_spec(0)).task_id
                client.wait(finished, timeout=120)
                read = reads(service.port, finished, threads, rounds, read_seconds)
        finally:
            client.close()
    base = median(seconds["library"])
    rows = [
        [
            name,
            f"{median(values) * 1e3:.0f} (±{spread(values):.1%})",
            "" if name == "library" else f"{(median(values) - base) * 1e3:+.0f} ms ({median(values) / base - 1:+.1%})",
        ]
        for name, values in seconds.items()
    ]
    section.table(["submit -> final state", "ms per job", "added by the service"], rows)
    section.table(
        ["request", "client threads", "requests/s"],
        [[r.label, r.threads, f"{median(r.rates):,.0f} (±{spread(r.rates):.1%})"] for r in read],
        align="lrr",
    )
    sse, wait = median(seconds["HTTP + SSE"]), median(seconds["HTTP + Prefer: wait"])
    section.line(
        f"- SSE: the stream reads the job every {POLL:g} s, so it shows the final state at the first read after the "
        f"job ended: up to about {POLL * 1e3:.0f} ms late, all of one interval when the whole job ({base * 1e3:.0f} ms "
        "here) fits in it. `Prefer: wait` follows the job as the library does (woken by the result backend), so "
        "its difference is the HTTP round trip, the spec check and the Job JSON."
    )
    section.line(
        f"http: the service adds {(sse - base) * 1e3:+.0f} ms a job followed by SSE, {(wait - base) * 1e3:+.0f} ms "
        f"with Prefer: wait, to the library's {base * 1e3:.0f} ms; GET /v1/jobs/{{id}} "
        f"{median(read[0].rates):,.0f}/s in a row, {max(median(r.rates) for r in read[1:-1]):,.0f}/s at best "
        "with threads"
    )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 s per read case (about a minute)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (a multiple of 3)")
    parser.add_argument("--threads", default="4,16", help="concurrent client threads for the read cases")
    parser.add_argument("--read-seconds", type=float, default=None, help="seconds per read case (default 2; 1 quick)")
    args = parser.parse_args()
    threads = tuple(int(n) for n in args.threads.split(","))
    read_seconds = args.read_seconds or (1.0 if args.quick else 2.0)
    run(rounds=3 if args.quick else args.rounds, threads=threads, read_seconds=read_seconds)


if __name__ == "__main__":
    main()
