"""Helpers shared by the test tiers. Ports and waiting come from `localfarm.cluster`, which the demo uses too."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from localfarm.cluster import free_port, stop_process, wait_until
from producer import RenderSpec
from producer.errors import FarmUnavailable
from producer.keys import RUNNING_TASKS
from worker.storage import Storage

__all__ = [
    "UNetCalls",
    "free_port",
    "http_answers",
    "pixels",
    "port_open",
    "render_cli",
    "wait_for_jobs",
    "wait_until",
]

ROOT = Path(__file__).parents[1]


def render_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The `render` command as a real process in the repository root, with `env` over this environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def render_here(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `render` command's entry point (`worker.cli.main`: parsing, the one-line errors, the exit status) run
    in this process from the repository root: the same code as `render_cli` without the seconds a new
    interpreter spends importing torch. Its output and exit status come back as `render_cli` gives them."""
    from worker.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    os.environ.update(env or {})
    sys.argv = ["render", *args]
    os.chdir(ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["render", *args], code, out.getvalue(), err.getvalue())


def wait_for_jobs(client: Any, task_ids: Sequence[str], *, stall: float = 180, interval: float = 0.25) -> list[Any]:
    """The manifests of `task_ids` once every one is final. Fails only when no job moves (a state or a step
    changes) for `stall` seconds: a busy machine makes this slower, never red, while a stuck farm still fails.
    A moment with the farm's Redis unreachable (the fault tests make them) counts as a moment nothing moved.
    """
    last: list[tuple[str, int | None]] | None = None
    moved = time.monotonic()
    while True:
        try:
            statuses = client.statuses(list(task_ids))
        except FarmUnavailable:
            statuses = None
        if statuses is not None and all(s.done for s in statuses):
            return [s.manifest for s in statuses]
        now = None if statuses is None else [(s.state, s.step) for s in statuses]
        if now is not None and now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            waiting = [f"{s.task_id}: {s.state} step {s.step}" for s in statuses or [] if not s.done]
            raise TimeoutError(f"no job moved for {stall:.0f} s; still waiting on: {'; '.join(waiting) or 'Redis'}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_answers(url: str) -> bool:
    """Whether `url` answers an HTTP GET with any status at all."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1)
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status > 0
    finally:
        connection.close()


def stored_checkpoint(s3_endpoint: str, bucket: str, task_id: str) -> Any:
    """The job's checkpoint in the bucket (a `worker.engine.checkpoints.Checkpoint`), read straight from the S3
    server; None when there is none."""
    import boto3

    from worker.engine.checkpoints import decode

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    try:
        body = s3.get_object(Bucket=bucket, Key=f"renders/{task_id}/checkpoint.pt")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return decode(body)


def pixels(storage: Storage, url: str) -> bytes:
    """The decoded pixels of a stored image (PNG metadata differs between tasks; pixels must not)."""
    data = storage.get(url.removeprefix(storage.base_url + "/"))
    assert data is not None, f"{url} is not in storage"
    return Image.open(io.BytesIO(data)).tobytes()


class UNetCalls:
    """At every UNet call: the batch, and the IP-Adapter scale in force (None without one). A context manager."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.batches: list[int] = []
        self.ip_scales: list[float | None] = []
        self._handle: Any = None

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.batches.append((args[0] if args else kwargs["sample"]).shape[0])
        processor = next(p for n, p in module.attn_processors.items() if n.endswith("attn2.processor"))
        scale = getattr(processor, "scale", None)
        self.ip_scales.append(float(scale[0]) if scale is not None else None)

    def __enter__(self) -> UNetCalls:
        self._handle = self.pipe.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def running(client: Any) -> set[str]:
    """The task ids in `render:running`: the jobs whose lease a worker holds."""
    return {key.decode() if isinstance(key, bytes) else str(key) for key in client.hkeys(RUNNING_TASKS)}


SIZE = 64  # the side of the tiny pipelines' test images


def png(path: Path, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> str:
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path.as_uri()


def pipeline_spec(kind: str, folder: Path, model: str = "tiny-sd15", **overrides: Any) -> RenderSpec:
    images: dict[str, str] = {}
    if kind in ("img2img", "inpaint"):
        images["image"] = png(folder / "image.png")
    if kind == "inpaint":
        images["mask_image"] = png(folder / "mask.png", mode="L")
    if kind == "controlnet":
        images["control_image"] = png(folder / "edges.png")
    data = {
        "model": model,
        "pipeline": kind,
        "prompt": "a lighthouse",
        "num_inference_steps": 10,
        "width": SIZE,
        "height": SIZE,
        "seed": 3,
        **images,
        **overrides,
    }
    return RenderSpec.parse(data)


class Gate:
    """A hook that holds the GPU thread at the first step until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.open = threading.Event()

    def on_step(self, info: Any) -> None:
        self.reached.set()
        assert self.open.wait(60)


@contextlib.contextmanager
def render_serve(command: Sequence[str], env: Mapping[str, str], log: Path) -> Iterator[str]:
    """`render serve` as a real process (`command`: the executable and its arguments, ending with `--port P`),
    its output appended to `log`; yields its base URL once /healthz answers, and stops it when the block ends."""
    port = command[list(command).index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as sink:
        process = subprocess.Popen(list(command), cwd=ROOT, env=dict(env), stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_until(
                lambda: http_answers(url + "/healthz"), timeout=60, what="render serve", process=process, log=log
            )
            yield url
        finally:
            stop_process(process)
