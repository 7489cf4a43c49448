"""`render demo`: the whole system on one machine, with nothing set up beforehand.

It starts a private redis-server (unless RENDER_REDIS_URL is set) and one worker, submits a small
batch through the producer library, shows a live progress bar per job, revokes one job while it
runs, prints a summary table and writes a contact sheet of the step frames. It stops everything
it started.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table

from localfarm.cluster import RedisServer, WorkerProcess
from producer.client import JobHandle, RenderClient, TaskStatus
from producer.settings import ClientSettings
from worker.storage import open_storage
from worker.views.batch_view import index_rows
from worker.views.display import JobBoard, table_console
from worker.views.gallery import write_index


@dataclass(frozen=True)
class DemoJob:
    name: str
    spec: dict[str, Any]
    expected: str
    revoke_at_step: int | None = None


def _base(model: str, steps: int, size: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "a lighthouse on a cliff at dusk",
        "num_inference_steps": steps,
        "width": size,
        "height": size,
        "seed": 42,
        **extra,
    }


JOBS = [
    DemoJob(
        "lora-cfg-cutoff",
        _base(
            "tiny-sd15",
            30,
            128,
            num_images=2,
            scheduler="dpmpp_2m_karras",
            loras=[{"name": "tiny-lora", "scale": 0.8}],
            callbacks=[{"type": "cfg_cutoff", "step_ratio": 0.4}],
        ),
        "succeeded",
    ),
    DemoJob(
        "frames-euler-a",
        _base("tiny-sdxl", 24, 128, scheduler="euler_a", callbacks=[{"type": "frames", "every": 3, "size": 128}]),
        "succeeded",
    ),
    DemoJob(
        "step-budget", _base("tiny-sd15", 40, 128, callbacks=[{"type": "step_budget", "max_steps": 12}]), "interrupted"
    ),
    DemoJob("revoked", _base("tiny-sd15", 150, 256), "revoked", revoke_at_step=10),
    DemoJob("flux", _base("tiny-flux", 12, 128, scheduler="flow_euler", guidance_scale=3.5), "succeeded"),
]


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def contact_sheet(storage_url: str, endpoint: str | None, frames: list[str], path: Path) -> Path | None:
    storage = open_storage(storage_url, s3_endpoint_url=endpoint)
    images = []
    for url in frames:
        data = storage.get(url.removeprefix(storage.base_url + "/"))
        if data is not None:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    if not images:
        return None
    w, h = images[0].size
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def run_demo(out: Path, stream: TextIO = sys.stderr, echo: Callable[[str], None] = print) -> bool:
    """Run the demo; True when every job ended in its expected state. Progress goes to `stream`, the rest to
    `echo` and the summary table to standard output."""
    return _run(out, Console(file=stream), echo, table_console(sys.stdout))


def _run(out: Path, board_console: Console, echo: Callable[[str], None], console: Console) -> bool:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    external_redis = os.environ.get("RENDER_REDIS_URL")
    storage_url = os.environ.get("RENDER_STORAGE_URL") or (out / "renders").as_uri()
    endpoint = os.environ.get("RENDER_S3_ENDPOINT_URL")
    redis_server = None if external_redis else RedisServer(workdir=Path(tempfile.mkdtemp(prefix="render-demo-")))
    worker: WorkerProcess | None = None
    try:
        if redis_server is not None:
            redis_server.start()
        redis_url = external_redis or (redis_server.url if redis_server else "")
        echo(f"redis: {redis_url} ({'yours' if external_redis else 'private, started by the demo'})")
        echo(f"storage: {storage_url}")
        client = RenderClient(ClientSettings(redis_url=redis_url))
        env = {"RENDER_REDIS_URL": redis_url, "RENDER_STORAGE_URL": storage_url, "RENDER_PROGRESS_INTERVAL": "0.1"}
        worker = WorkerProcess("demo", env, out / "worker.log").start()
        echo(f"worker: {worker.hostname} (log: {out / 'worker.log'}); waiting for it to be ready ...")
        worker.wait_ready(client.app, timeout=120)
        started = time.monotonic()
        batch_name = f"demo-{uuid.uuid4().hex[:8]}"
        batch = client.submit_batch([job.spec for job in JOBS], name=batch_name, source="render demo")
        echo(batch.summary())
        handles = [JobHandle(task_id, client) for task_id in batch.task_ids]
        names = [job.name for job in JOBS]
        final: dict[str, TaskStatus] = {}
        revoked: set[str] = set()
        with JobBoard(names, board_console) as board:
            while len(final) < len(JOBS):
                for job, handle in zip(JOBS, handles, strict=True):
                    if job.name in final:
                        continue
                    status = client.status(handle.task_id)
                    board.update(job.name, status)
                    if job.revoke_at_step and job.name not in revoked and (status.step or 0) >= job.revoke_at_step:
                        client.revoke(handle.task_id)
                        revoked.add(job.name)
                    if status.done:
                        final[job.name] = status
                if time.monotonic() - started > 600:
                    raise TimeoutError("the demo's jobs did not finish within 10 minutes; see the worker log")
                time.sleep(0.1)
        elapsed = time.monotonic() - started
        table = Table("job", "status", "steps", "seconds", "files", box=box.SIMPLE_HEAD)
        ok = True
        frames: list[str] = []
        for job in JOBS:
            status = final[job.name]
            manifest = status.manifest
            steps = f"{manifest.steps_completed}/{manifest.steps_planned}" if manifest else "-"
            took = f"{_seconds(manifest.started_at, manifest.finished_at):.2f}" if manifest else "-"
            where = f"{storage_url}/{manifest.task_id}/" if manifest else "-"
            mark = "" if status.state == job.expected else f"  (expected {job.expected})"
            ok = ok and status.state == job.expected
            table.add_row(job.name, status.state, steps, took, where + mark)
            if manifest:
                frames.extend(manifest.frames)
        console.print(table, highlight=False)
        sheet = contact_sheet(storage_url, endpoint, frames, out / "contact-sheet.png")
        echo(f"\n{len(JOBS)} jobs in {elapsed:.1f} s; contact sheet of the frames: {sheet}")
        _, gallery = write_index(open_storage(storage_url, s3_endpoint_url=endpoint), batch_name, index_rows(batch))
        echo(f"gallery of batch {batch_name} (open it in a browser): {gallery}")
        echo("every job ended as expected" if ok else "some jobs did not end as expected")
        client.close()
        return ok
    finally:
        if worker is not None:
            worker.stop()
        if redis_server is not None:
            redis_server.stop()
