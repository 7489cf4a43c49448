"""Tenants: the teams one farm is shared by, their weights and their quotas.

Every job belongs to a tenant: the client's `RENDER_TENANT` (library clients), the API key's `tenant` (the HTTP
service), `default` when unset. The farm declares its tenants in `RENDER_TENANTS` on the workers, as JSON:
`{"team-a": {"weight": 2, "max_queued": 1000, "max_gpus": 4, "deadline_seconds": 3600}}`; each worker publishes that
to Redis (`render:tenants`) at start, and producers read it there, so a producer cannot raise its own quota or make
up a tenant to get a fresh share. `default` always exists (weight 1, no quota unless declared).

- `weight`: within one priority, workers take the next job from the tenants with jobs waiting in weighted turn
  (worker.process.fairshare); a tenant of weight 2 gets two jobs to a weight-1 tenant's one. FIFO inside a tenant.
- `max_queued`: the most jobs the tenant may have waiting (all models, all priorities); a submit that would pass it
  raises `QuotaExceeded` (HTTP 429 with Retry-After) and enqueues nothing.
- `max_gpus`: the most of its jobs workers hold at once; past it, its jobs wait while other tenants' are taken.
- `deadline_seconds`: the deadline of its jobs that set none (docs/spec.md: Deadlines).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer import admission
from producer.errors import QuotaExceeded
from producer.keys import (
    DEFAULT_TENANT,
    TENANTS,
    tenant_name,
)
from producer.spec import MAX_DEADLINE_SECONDS

RETRY_AFTER_SECONDS = 30.0
"""What a `QuotaExceeded` tells a submitter to wait: long enough for some of its queued jobs to start."""


class TenantConfig(BaseModel):
    """One tenant's entry in RENDER_TENANTS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=1.0, gt=0, le=1000, description="its share of the fleet against other tenants'")
    max_queued: int | None = Field(default=None, ge=1, description="the most jobs it may have waiting; unset: no cap")
    max_gpus: int | None = Field(default=None, ge=1, description="the most of its jobs running at once; unset: no cap")
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_SECONDS,
        description="the deadline of its jobs that set no `deadline_seconds`; unset: none",
    )


def parse_tenants(value: Any) -> dict[str, TenantConfig]:
    """RENDER_TENANTS as people write it (a JSON object, or the dict itself): every name checked, every entry
    validated; a ValueError naming the tenant and the field otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'is not JSON ({exc.msg}); write {{"team-a": {{"weight": 2, "max_queued": 1000}}}}'
            ) from None
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object of tenants, like {"team-a": {"weight": 2}}')
    tenants: dict[str, TenantConfig] = {}
    for name, entry in value.items():
        tenant_name(name)
        try:
            tenants[name] = entry if isinstance(entry, TenantConfig) else TenantConfig.model_validate(entry or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"tenant {name!r}: {problems}") from None
    return tenants


def names(tenants: Mapping[str, TenantConfig]) -> list[str]:
    """`default` and each declared tenant, once (RENDER_TENANTS may declare `default` too): whose lists a worker
    polls and watches, and whose staged messages and slots its recovery scan looks after."""
    return [DEFAULT_TENANT, *sorted(name for name in tenants if name != DEFAULT_TENANT)]


def publish(client: redis.Redis, tenants: dict[str, TenantConfig]) -> None:
    """Make `tenants` the farm's declared tenants (`render:tenants`), replacing what was there, in one transaction:
    what a worker does at start, so the fleet's tenants are those of the worker started last."""
    writes = client.pipeline(transaction=True)
    writes.delete(TENANTS)
    if tenants:
        writes.hset(
            TENANTS, mapping={name: config.model_dump_json(exclude_none=True) for name, config in tenants.items()}
        )
    writes.execute()


def declared(client: redis.Redis) -> dict[str, TenantConfig]:
    """The farm's declared tenants, as its workers published them (`default` always among them)."""
    raw: dict[bytes, bytes] = client.hgetall(TENANTS)  # type: ignore[assignment]
    tenants = {DEFAULT_TENANT: TenantConfig()}
    for name, entry in raw.items():
        try:
            tenants[name.decode()] = TenantConfig.model_validate_json(entry)
        except (ValidationError, UnicodeDecodeError):
            continue  # written by a newer worker with fields this producer does not know: not this client's tenant
    return tenants


def queued(client: redis.Redis, tenant: str, queues: Iterable[str]) -> int:
    """How many of `tenant`'s jobs wait in `queues` (base queue names, every priority): one pipelined round trip."""
    return sum(admission.waiting(client, queues, [tenant]).values())


def check_quota(client: redis.Redis, tenant: str, config: TenantConfig, queues: Iterable[str], adding: int) -> None:
    """Raise `QuotaExceeded` if `adding` more jobs would give `tenant` more than its `max_queued` waiting in
    `queues` (the base queues of the models the farm serves and of the jobs being submitted). A soft bound, like
    RENDER_MAX_QUEUED: submitters racing each other can each pass it by what they send at once."""
    if config.max_queued is None or adding <= 0:
        return
    waiting = queued(client, tenant, queues)
    if waiting + adding > config.max_queued:
        raise QuotaExceeded(tenant, waiting, adding, config.max_queued, RETRY_AFTER_SECONDS)
