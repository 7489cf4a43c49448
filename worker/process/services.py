"""What one worker process keeps between jobs: the loaded models above all, the GPU thread, the Redis clients, the
storage, and the threads that serve every job (revocation watch, webhook sender). Built once per process, when the
worker starts (`worker.celery_app`'s bootstep), from the settings alone: nothing here knows Celery, so a test builds
them, and runs jobs through `worker.process.runner`, with no broker.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
from redis import Redis

from worker import metrics
from worker.engine.drain import Drain
from worker.models.registry import ModelRegistry
from worker.process.fleet import JobAdvert
from worker.process.gpu import Deliveries, GpuRunner
from worker.process.jobcontrol import RevocationWatch, control_client, patient_client
from worker.process.webhooks import WebhookSender
from worker.settings import WorkerSettings
from worker.storage import Storage, open_storage


@dataclass
class Services:
    """The per-process parts every job uses (`start` builds and starts them)."""

    settings: WorkerSettings
    registry: ModelRegistry
    storage: Storage
    redis: Redis  # task-level reads and writes: redis-py's retries are welcome here
    control: Redis  # the per-step check: fast failure, never a stalled step
    owner: str  # host:pid, the name leases and running records give this process
    webhooks: WebhookSender  # its own thread: a slow receiver never delays the next job
    advert: JobAdvert
    gpu: GpuRunner
    revocations: RevocationWatch  # its own thread: pushed revocations of the jobs in hand, as flags the steps read
    withdrawn: dict[str, str] = field(default_factory=dict)  # model -> why it failed to load here: its jobs go on
    drain: Drain = field(default_factory=Drain)  # begun on SIGTERM (`worker.celery_app`)

    @classmethod
    def start(cls, settings: WorkerSettings, *, hostname: str | None, deliveries: Deliveries | None = None) -> Services:
        """Build the services of a worker called `hostname` (Celery's node name) and start their threads.

        `deliveries` tells the GPU thread when the broker last delivered a job, for micro-batching.
        """
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        if settings.compile_cache:  # read by inductor when it compiles: before any model loads
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        metrics.serve(settings.metrics_port)
        redis_client = patient_client(settings.redis_url, **settings.sentinel)
        control = control_client(settings.redis_url, **settings.sentinel)
        registry = ModelRegistry.from_settings(settings)
        advert = JobAdvert(control, hostname, registry)
        webhooks = WebhookSender(
            redis_client,
            secret=settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
            allowed_hosts=settings.webhook_hosts,
            max_attempts=settings.webhook_attempts,
            backoff=settings.webhook_backoff_seconds,
            timeout=settings.webhook_timeout,
        )
        webhooks.start()
        owner = f"{hostname or socket.gethostname()}:{os.getpid()}"
        return cls(
            settings=settings,
            registry=registry,
            storage=open_storage(
                settings.storage_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                retry_seconds=settings.storage_retry_seconds,
            ),
            redis=redis_client,
            control=control,
            owner=owner,
            webhooks=webhooks,
            advert=advert,
            gpu=GpuRunner(
                registry,
                max_batch=settings.max_batch,
                on_call=lambda ids: advert.job_started(ids[0]),
                on_idle=advert.job_ended,
                deliveries=deliveries,
            ),
            revocations=RevocationWatch(control, owner, poll=settings.revocation_poll_interval).start(),
        )

    def begin_drain(self) -> None:
        """SIGTERM: jobs that will not finish within `RENDER_DRAIN_SECONDS` go back to their queues (`worker.engine.
        drain`); the GPU takes no new job."""
        self.drain.begin(self.settings.drain_seconds)
        self.gpu.drain()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads that wait on Redis (revocation watch, webhook sender); the GPU thread is a daemon that
        ends with the process. For embedders and tests that start services without a worker around them."""
        self.revocations.close()
        self.webhooks.stop(timeout)
