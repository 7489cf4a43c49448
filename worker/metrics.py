"""Prometheus metrics of one worker process, served on `RENDER_METRICS_PORT` by the process that renders.

The endpoint listens from the worker's start (`worker.celery_app`), so an idle worker is up to Prometheus.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import Counter, Histogram, start_http_server

from producer.keys import tenant_of
from producer.manifest import Manifest
from worker.hooks import StepInfo

log = logging.getLogger(__name__)

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0)

# `tenant`: the job's tenant (producer.keys.tenant_of); tenants are declared (RENDER_TENANTS), so the label's values
# are few, and a bare id's job counts as `default`.
JOBS = Counter("render_jobs_total", "Jobs by final status and tenant.", ["status", "tenant"])
STEP_SECONDS = Histogram("render_step_seconds", "Seconds per denoising step.", ["model"], buckets=_FAST)
QUEUE_WAIT = Histogram(
    "render_queue_wait_seconds", "Seconds from submit to the start of rendering.", ["tenant"], buckets=_SLOW
)
REVOKE_TO_STOP = Histogram("render_revoke_to_stop_seconds", "Seconds from a revoke to the job stopping.", buckets=_FAST)
FRAME_UPLOAD = Histogram("render_frame_upload_seconds", "Seconds to encode and store one step frame.", buckets=_FAST)
MODEL_LOADS = Counter("render_model_loads_total", "Pipelines loaded (cache hits not counted).", ["model"])
COMPILE_SECONDS = Histogram(
    "render_compile_seconds", "Seconds a compiled model's compile and warm-up render took.", ["model"], buckets=_SLOW
)
PIPELINE_LOAD = Histogram("render_pipeline_load_seconds", "Seconds to get a pipeline (cached: near 0).", buckets=_SLOW)
# The step hooks' cost on the denoising thread (lease and revocation flags, progress post, time limit, StepTimer):
# seconds / calls is their mean per model call, as bench/bench_worker.py reads it from a real worker.
STEP_HOOK_SECONDS = Counter("render_step_hook_seconds_total", "Seconds the step hooks took, per model.", ["model"])
STEP_HOOK_CALLS = Counter("render_step_hook_calls_total", "Model calls whose step hooks ran, per model.", ["model"])


_served: set[tuple[int, int]] = set()  # (pid, port): a forked child serves its own


def serve(port: int | None) -> None:
    """Start the /metrics endpoint once per process (0 or None: off); a second call for the port does nothing."""
    if not port or (os.getpid(), port) in _served:
        return
    try:
        start_http_server(port, addr="0.0.0.0")
    except OSError as exc:
        log.error("metrics port %d is not free (%s); metrics are off in this process", port, exc)
    _served.add((os.getpid(), port))


class StepTimer:
    """A step hook observing the time of each denoising step."""

    def __init__(self, model: str) -> None:
        self.histogram = STEP_SECONDS.labels(model=model)
        self.last: float | None = None

    def on_step(self, info: StepInfo) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.histogram.observe(now - self.last)
        elif info.steps_completed > 0:
            self.histogram.observe(info.elapsed / info.steps_completed)
        self.last = now


def record_hooks(model: str, seconds: float, calls: int) -> None:
    """A job's step-hook time (`StepControlCallback.hook_seconds` over `hook_calls`), once, when it ends."""
    STEP_HOOK_SECONDS.labels(model=model).inc(seconds)
    STEP_HOOK_CALLS.labels(model=model).inc(calls)


def record(manifest: Manifest) -> None:
    """Everything a finished job's manifest tells the metrics."""
    JOBS.labels(status=manifest.status, tenant=manifest.tenant).inc()
    timings = manifest.timings
    if timings.queue_wait is not None:
        QUEUE_WAIT.labels(tenant=manifest.tenant).observe(timings.queue_wait)
    if timings.load is not None:
        PIPELINE_LOAD.observe(timings.load)
    if timings.revoke_to_stop is not None:
        REVOKE_TO_STOP.observe(timings.revoke_to_stop)


def failed(task_id: str) -> None:
    """Count a job that failed where no manifest reached `record` (a render error, a job whose workers kept dying)."""
    JOBS.labels(status="failed", tenant=tenant_of(task_id)).inc()
