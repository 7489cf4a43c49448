"""What `render workers` shows: the live workers (each one's job in hand and its tenant) and the jobs queued per
model, every tenant's together, with each tenant's share where the farm declares tenants."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich import box
from rich.table import Table

from producer.fleet import summed
from producer.keys import PRIORITIES, tenant_of
from producer.records import WorkerInfo

QueuesByTenant = dict[str, dict[str, dict[str, int]]]
"""tenant -> model -> priority -> jobs waiting (producer.fleet.tenant_queue_lengths)."""


def job_tenant(info: WorkerInfo) -> str | None:
    """The tenant of the worker's job in hand, from the job's id (`team-a@<id>`); None when idle."""
    return tenant_of(info.job) if info.job else None


def workers_dict(found: list[WorkerInfo], by_tenant: QueuesByTenant) -> dict[str, Any]:
    """`render workers --json`: each worker's advert with its job's `tenant`, the queues summed over the tenants
    (`queues`) and per tenant (`queues_by_tenant`)."""
    return {
        "workers": [{**dataclasses.asdict(info), "tenant": job_tenant(info)} for info in found],
        "queues": summed(by_tenant),
        "queues_by_tenant": by_tenant,
    }


def fleet_table(found: list[WorkerInfo], now: float) -> Table:
    table = Table(
        "worker", "models", "loaded", "job", "step", "loads", "last seen", "families", "tenant", box=box.SIMPLE_HEAD
    )
    for info in found:
        table.add_row(
            info.hostname,
            ", ".join(info.models),
            ", ".join(info.loaded) or "-",
            info.job or "idle",
            f"{info.step}/{info.total}" if info.job and info.step is not None and info.total else "-",
            ", ".join(f"{model} {count}" for model, count in sorted(info.loads.items())) or "-",
            f"{max(0.0, now - info.last_seen):.0f} s ago",
            ", ".join(sorted(set(info.families.values()))) or "-",
            job_tenant(info) or "-",
        )
    return table


def queue_table(by_tenant: QueuesByTenant, queue: str) -> Table:
    """Jobs queued per model and priority, every tenant's; with declared tenants, a column of each tenant's jobs
    waiting for the model (those with none left out)."""
    tenants = len(by_tenant) > 1
    columns = [*PRIORITIES, "tenants"] if tenants else list(PRIORITIES)
    table = Table("model", *columns, title=f"jobs queued (queue {queue})", box=box.SIMPLE_HEAD)
    for model, lengths in sorted(summed(by_tenant).items()):
        cells = [str(lengths[priority]) for priority in PRIORITIES]
        if tenants:
            shares = {tenant: sum(models.get(model, {}).values()) for tenant, models in sorted(by_tenant.items())}
            cells.append(", ".join(f"{tenant} {count}" for tenant, count in shares.items() if count) or "-")
        table.add_row(model, *cells)
    return table
