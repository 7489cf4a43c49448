"""The worker's Celery app: settings that matter on GPUs, the task, and the bootstep that starts the process's
services (`worker.process.services`) and its fleet threads (recovery scanner, affinity watcher, heartbeat).

`celery -A worker.celery_app inspect|control|events|flower ...` works as every Celery user types it: the
module's `app` is built on first use from the same `RENDER_*` settings a worker reads.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

from celery import Celery, Task, bootsteps
from celery.signals import task_received, worker_init, worker_shutdown, worker_shutting_down

from producer import tenants
from producer.celery_config import base_config
from producer.errors import ConfigError, ModelError, SpecError
from producer.keys import TASK_RENDER, model_queue, priority_lists, tenant_queue
from producer.redis_connect import connect, is_sentinel
from worker import metrics
from worker.process.affinity import Affinity, AffinityWatcher
from worker.process.fairshare import tenants_option
from worker.process.fleet import Heartbeat
from worker.process.gpu import Deliveries
from worker.process.jobcontrol import control_client
from worker.process.recovery import RecoveryScanner
from worker.process.runner import JobRunner
from worker.process.services import Services
from worker.process.tasks import run_render
from worker.process.transport import AMQP, affinity_option
from worker.settings import WorkerSettings, load_settings
from worker.storage import open_storage

log = logging.getLogger(__name__)


class RenderApp(Celery):
    """The GPU worker's Celery app: Celery's, plus the worker's settings and its per-process parts, typed."""

    render_settings: WorkerSettings
    deliveries: Deliveries  # when the broker last delivered a job (micro-batching waits while a burst arrives)
    recovery_scanner: RecoveryScanner
    affinity_watcher: AffinityWatcher
    heartbeat: Heartbeat
    _runner: JobRunner | None = None

    @property
    def runner(self) -> JobRunner:
        """The process's job runner, from the moment the worker starts (`ServicesStep`)."""
        if self._runner is None:
            raise ConfigError("the render worker's services are not started: run it with `render worker`")
        return self._runner


class ServicesStep(bootsteps.StartStopStep):
    """Starts the process's services (models, GPU thread, Redis clients, storage, revocation watch, webhook
    sender) and its fleet threads (recovery scanner, affinity watcher, heartbeat) when the worker starts, before it
    consumes; stops the fleet threads when it stops."""

    def start(self, parent: Any) -> None:
        app: RenderApp = parent.app
        pool = getattr(parent, "pool_cls", None)
        if getattr(pool, "__module__", "") not in _POOLS:
            raise ConfigError(
                f"the render worker runs its jobs on threads (--pool=threads), not on {getattr(pool, '__name__', pool)}"
                ": its GPU thread and loaded models are shared by the jobs of one process"
            )
        hostname = getattr(parent, "hostname", None)
        app._runner = JobRunner(Services.start(app.render_settings, hostname=hostname, deliveries=app.deliveries))
        app.recovery_scanner.owner = hostname or app.recovery_scanner.owner
        tenants.publish(app.recovery_scanner.client, app.render_settings.tenants)  # what producers check quotas by
        app.recovery_scanner.start()
        app.affinity_watcher.start()
        app.heartbeat.start(hostname)

    def stop(self, parent: Any) -> None:
        app: RenderApp = parent.app
        app.heartbeat.stop()
        app.recovery_scanner.stop()
        app.affinity_watcher.stop()


_POOLS = ("celery.concurrency.thread", "celery.concurrency.solo")


def create_app(settings: WorkerSettings) -> RenderApp:
    """A Celery app for one GPU worker; `settings` were validated (visibility timeout > time limit)."""
    app = RenderApp("render-worker", set_as_current=True, amqp=AMQP)
    conf = base_config(settings.redis_url, queue=settings.queue, result_ttl=settings.result_ttl, **settings.sentinel)
    affinity = Affinity([model_queue(settings.queue, model) for model in settings.models])
    conf["broker_transport_options"] = {
        **conf["broker_transport_options"],
        "visibility_timeout": settings.visibility_timeout,
        **affinity_option(affinity),  # read by worker.process.transport's channel: which list to poll first
        **tenants_option(settings.tenants),  # and whose jobs it takes in turn (worker.process.fairshare)
    }
    conf.update(
        # kombu's Redis transport, except that a non-JSON item pushed onto the queue is dropped, not fatal.
        broker_transport="worker.process.transport:"
        + ("SentinelTransport" if is_sentinel(settings.redis_url) else "Transport"),
        # A job is acknowledged when it ends, and handed back if its process dies: never lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One process per GPU, one thread per job in hand (worker.process.gpu runs the pipelines on its own thread);
        # the hard time limit is worker.process.gpu's, since Celery's thread pool enforces none.
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.jobs_in_hand,
        worker_pool="threads",
        # Flower sees every job, its start and its progress events.
        worker_send_task_events=True,
        # STARTED is set by the task when the GPU takes the job (worker.process.tasks), not when a job thread takes it:
        # a job held while another denoises still shows `queued`.
        task_track_started=False,
        # Off, against Celery's advice for AMQP: on a lost Redis connection Celery would SIGTERM the render
        # and record it as REVOKED, a false final state, for a job it then delivers again. Left running,
        # the render rides through a Redis blip; its acknowledgement goes out on the new connection, or
        # the recovery scanner cleans up after it (tests/faults/test_redis.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # A job's final state must survive a Redis restart at the moment it ends: retry for about 30 s.
        result_backend_max_retries=12,
    )
    app.conf.update(conf)
    app.render_settings = settings
    app.deliveries = deliveries = Deliveries()
    app.steps["worker"].add(ServicesStep)

    # Spec, model and config errors are the caller's: logged as one line, no traceback.
    @app.task(name=TASK_RENDER, bind=True, shared=False, throws=(SpecError, ModelError, ConfigError))  # type: ignore[untyped-decorator]
    def render_task(self: Task, spec_json: Any) -> dict[str, Any]:
        return run_render(self, app.runner, app.heartbeat, spec_json)

    app.recovery_scanner = RecoveryScanner(
        app,
        connect(settings.redis_url, socket_connect_timeout=5, socket_timeout=10, **settings.sentinel),
        interval=settings.recovery_interval,
        owner=socket.gethostname(),
        storage=lambda: open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, retry_seconds=settings.storage_retry_seconds
        ),
        grace=settings.lease_ttl,
        max_attempts=settings.max_attempts,
        result_ttl=settings.result_ttl,
        tenants=tenants.names(settings.tenants),
    )

    app.affinity_watcher = AffinityWatcher(
        connect(settings.redis_url, socket_connect_timeout=5, socket_timeout=10, **settings.sentinel),
        affinity,
        [
            name
            for queue in consumed_queues(settings)
            for tenant in tenants.names(settings.tenants)
            for name in priority_lists(tenant_queue(queue, tenant)).values()
        ],
        switch_after=settings.switch_after_seconds,
    )

    # The fast-failing client: a beat in flight cannot hold up a shutdown for long.
    app.heartbeat = Heartbeat(
        control_client(settings.redis_url, **settings.sentinel),
        hostname=socket.gethostname(),
        models=list(settings.models),
        families={name: model.family for name, model in settings.models.items()},
        queues=consumed_queues(settings),
        interval=settings.heartbeat_interval,
        ttl=settings.heartbeat_ttl,
    )

    signals_seen: list[Any] = []

    def drain(sig: Any = None, **_: Any) -> None:
        """SIGTERM (or a first SIGINT): hand the jobs in hand back (`worker.engine.drain`) while Celery's warm shutdown
        waits for their threads. A second signal exits at once: the leases lapse and recovery moves the jobs, from
        their last checkpoints."""
        signals_seen.append(sig)
        if len(signals_seen) > 1:
            os._exit(1)
        log.warning(
            "shutting down: jobs that will not finish within %.0f s go back to their queues (a second signal exits "
            "at once)",
            settings.drain_seconds,
        )
        if app._runner is not None:
            app._runner.services.begin_drain()

    def delivered(sender: Any = None, **_: Any) -> None:  # on the consumer's thread, before the job's own starts
        if getattr(sender, "app", None) is app:
            deliveries.mark()

    def serve_metrics(sender: Any = None, **_: Any) -> None:  # from the start: an idle worker is up to Prometheus
        if getattr(sender, "app", None) is app:
            metrics.serve(settings.metrics_port)

    worker_init.connect(serve_metrics, weak=False)
    worker_shutting_down.connect(drain, weak=False)
    task_received.connect(delivered, weak=False)
    return app


def consumed_queues(settings: WorkerSettings) -> list[str]:
    """A worker's queues: one per model it serves, then the bare queue of single-model fleets and older producers."""
    return [*(model_queue(settings.queue, model) for model in settings.models), settings.queue]


def worker_argv(settings: WorkerSettings, *, hostname: str | None, loglevel: str) -> list[str]:
    """The `celery worker` flags a GPU worker runs with (one process, a thread per job in hand, events on)."""
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.jobs_in_hand}",
        "--prefetch-multiplier=1",
        "--events",
        # Mingle (at start, ask every other worker for its revoked ids and logical clock) and gossip (hear every
        # other worker's events, for clock sync and leader election) are off: a revocation lives in Redis
        # (`render:revoked:<id>`, read before a job starts and pushed while it runs), nothing here elects a
        # leader, and gossip makes each worker consume the fleet's whole event stream, N² messages. Mingle
        # also cost every start a second of waiting for replies. Flower and `render workers` do not use
        # either: they read the task and heartbeat events (`--events`) and the workers' adverts.
        "--without-mingle",
        "--without-gossip",
        f"--queues={','.join(consumed_queues(settings))}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    return argv


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run `celery worker` with `argv` in this process and return the worker's exit status.

    Celery's `app.worker_main` drops the status, so a worker stopped by an unrecoverable error would exit
    0 and a supervisor that restarts failed processes would leave it down.
    """
    codes: list[int] = []

    def record(sender: Any = None, **_: Any) -> None:
        codes.append(int(getattr(sender, "exitcode", None) or 0))

    worker_shutdown.connect(record, weak=False)
    try:
        app.worker_main(argv)
    finally:
        worker_shutdown.disconnect(record)
    return codes[-1] if codes else 0


@functools.cache
def _app_from_environment() -> RenderApp:
    return create_app(load_settings())


def __getattr__(name: str) -> RenderApp:
    """`worker.celery_app.app`, the attribute Celery's `-A` option looks up: built once, from `RENDER_*`."""
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
