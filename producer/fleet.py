"""The live fleet as the workers advertise it in Redis: who is up, what each serves and runs, and the queues.

A worker's main process beats every `RENDER_HEARTBEAT_INTERVAL` seconds: it rewrites its hash
(`render:worker:<hostname>`, the fields of `WorkerInfo`) with a TTL of `RENDER_HEARTBEAT_TTL`, and its
score (the beat's time) in `render:workers` and in `render:model:<model>:workers` for each model it
serves. A worker is live while its hash exists: Redis expires it one TTL after the last beat, on the
server's clock, so a reader needs to know no worker's TTL and no clock but its own for the index.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from producer.keys import (
    DEFAULT_TENANT,
    TENANTS,
    WORKERS,
    model_queue,
    model_workers_key,
    priority_lists,
    tenant_queue,
    worker_key,
)
from producer.records import WorkerInfo, text

HEARTBEAT_TTL = 15.0
"""Default seconds a worker stays listed after its last heartbeat (`RENDER_HEARTBEAT_TTL`)."""
MAX_HEARTBEAT_TTL = 300.0
"""The largest `RENDER_HEARTBEAT_TTL` a worker accepts: readers look no further back in `render:workers`."""


def live_workers(client: redis.Redis, *, now: float | None = None) -> list[WorkerInfo]:
    """Every live worker, sorted by hostname: two round trips whatever the fleet's size."""
    now = time.time() if now is None else now
    names = client.zrangebyscore(WORKERS, now - MAX_HEARTBEAT_TTL, "+inf")
    if not names:
        return []
    reads = client.pipeline(transaction=False)
    for name in names:
        reads.hgetall(worker_key(text(name)))
    found = [WorkerInfo.from_hash(fields) for fields in reads.execute() if fields]  # {}: expired, so not live
    return sorted(found, key=lambda info: info.hostname)


def served_models(
    client: redis.Redis, models: Iterable[str], *, ttl: float = HEARTBEAT_TTL, now: float | None = None
) -> dict[str, int]:
    """How many workers serving each of `models` beat within the last `ttl` seconds: one round trip."""
    names = list(dict.fromkeys(models))
    now = time.time() if now is None else now
    counts = client.pipeline(transaction=False)
    for model in names:
        counts.zcount(model_workers_key(model), now - ttl, "+inf")
    return {model: int(count) for model, count in zip(names, counts.execute(), strict=True)}


def tenant_queue_lengths(
    client: redis.Redis, queue: str, models: Iterable[str], tenants: Iterable[str] | None = None
) -> dict[str, dict[str, dict[str, int]]]:
    """Jobs waiting per tenant, model and priority (`{"team-a": {"tiny-sd15": {"high": 0, "normal": 2, "low": 0}}}`).
    `tenants`: the tenants to count; None: every tenant the farm declares (`render:tenants`, plus `default`), a
    second round trip. A tenant's jobs wait in lists of their own (`team-a@render.tiny-sd15`), so a count of the
    default tenant's lists alone would miss them. A tenant's client passes its own name only: its Redis user may
    read no other tenant's lists."""
    if tenants is None:
        tenants = [DEFAULT_TENANT, *sorted(text(name) for name in client.hkeys(TENANTS))]
    slots = [
        (tenant, model, priority, name)
        for tenant in dict.fromkeys(tenants)
        for model in dict.fromkeys(models)
        for priority, name in priority_lists(tenant_queue(model_queue(queue, model), tenant)).items()
    ]
    lengths = client.pipeline(transaction=False)
    for *_, name in slots:
        lengths.llen(name)
    found: dict[str, dict[str, dict[str, int]]] = {}
    for (tenant, model, priority, _), count in zip(slots, lengths.execute(), strict=True):
        found.setdefault(tenant, {}).setdefault(model, {})[priority] = int(count)
    return found


def queue_lengths(
    client: redis.Redis, queue: str, models: Iterable[str], tenants: Iterable[str] | None = None
) -> dict[str, dict[str, int]]:
    """Jobs waiting per model and priority, summed over `tenants` (None: every declared one), as
    `tenant_queue_lengths` counts them: `{"tiny-sd15": {"high": 0, "normal": 2, "low": 0}}`."""
    return summed(tenant_queue_lengths(client, queue, models, tenants))


def summed(by_tenant: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """`tenant_queue_lengths`' counts added up over the tenants: per model and priority."""
    found: dict[str, dict[str, int]] = {}
    for lengths in by_tenant.values():
        for model, counts in lengths.items():
            total = found.setdefault(model, dict.fromkeys(counts, 0))
            for priority, count in counts.items():
                total[priority] = total.get(priority, 0) + count
    return found


def served_by(workers: Iterable[WorkerInfo]) -> list[str]:
    """The models at least one of `workers` serves, sorted."""
    return sorted({model for info in workers for model in info.models})


__all__ = [
    "HEARTBEAT_TTL",
    "MAX_HEARTBEAT_TTL",
    "WorkerInfo",
    "live_workers",
    "queue_lengths",
    "served_by",
    "served_models",
    "summed",
    "tenant_queue_lengths",
]
