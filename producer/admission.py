"""What a submit checks before it enqueues: the idempotency key it carries, and room in a bounded queue.

Idempotency: `submit(..., idempotency_key=K)` claims `render:idem:<sha256(K)>` with `SET NX` (atomic: of two
submits racing with one key, one enqueues and the other gets its job), holding the sha256 of the canonical spec JSON
and priority (`body`) and the task id; it lives `RENDER_RESULT_TTL`. The same key with the same body returns the
same job and enqueues nothing; with another body it raises `IdempotencyConflict`. A submit that fails after its claim
(no worker, a full queue, Redis) releases it, so the key can be used again.

Bounded queue: with `RENDER_MAX_QUEUED` set, a submit that would make a model's queue (all its priority lists) longer
than that raises `QueueFull` and enqueues nothing. The check reads the lists' lengths just before the send; submitters
racing each other can each pass it, so the bound may be overshot by what they send at once (a soft bound). Its
`retry_after` is `RETRY_AFTER_SECONDS`: the farm does not know its throughput per model cheaply.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence

import redis

from producer.errors import IdempotencyConflict, QueueFull, SpecError
from producer.keys import DEFAULT_TENANT, idempotency_key, priority_lists, tenant_queue
from producer.spec import RenderSpec

RETRY_AFTER_SECONDS = 5.0
"""What a `QueueFull` tells a submitter to wait before it tries again."""

MAX_KEY_LENGTH = 255

# Delete the claim only if it still names the submit that made it (another may have claimed the key since it lapsed).
_RELEASE = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['task_id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def check_key(key: str) -> str:
    """Return `key` if it is 1-255 printable characters; raise SpecError naming `Idempotency-Key` if not."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise SpecError(f"Idempotency-Key: must be 1-{MAX_KEY_LENGTH} printable characters; got {str(key)[:40]!r}")
    return key


def body_digest(spec: RenderSpec, priority: str) -> str:
    """The sha256 of the spec as canonical JSON (keys sorted, defaults filled in) and the priority: two submits
    that would enqueue the same job have the same digest, however their JSON was spelled."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{canonical}\n{priority}".encode()).hexdigest()


def earlier(client: redis.Redis, key: str, body: str, tenant: str = DEFAULT_TENANT) -> str | None:
    """The task id an earlier submit with `key` and this `body` made; None if the key names no submit now.
    Raises `IdempotencyConflict` if it names a submit of another body."""
    raw = client.get(idempotency_key(key, tenant))
    return None if raw is None else _same(raw, body)


def claim(
    client: redis.Redis, key: str, body: str, task_id: str, *, ttl: int, tenant: str = DEFAULT_TENANT
) -> str | None:
    """Claim `key` for the submit of `task_id` (SET NX): None when claimed; else what `earlier` says of the submit
    that holds it."""
    value = json.dumps({"body": body, "task_id": task_id})
    for _ in range(3):  # a claim that lapses between our SET and GET is claimed again
        if client.set(idempotency_key(key, tenant), value, nx=True, ex=ttl):
            return None
        if (found := earlier(client, key, body, tenant)) is not None:
            return found
    raise SpecError("Idempotency-Key: the key kept changing hands while this submit claimed it; retry")


def release(client: redis.Redis, key: str, task_id: str, tenant: str = DEFAULT_TENANT) -> None:
    """Give `key` up after the submit of `task_id` failed, unless another submit holds it now."""
    client.eval(_RELEASE, 1, idempotency_key(key, tenant), task_id)


def _same(raw: bytes | str, body: str) -> str:
    try:
        held = json.loads(raw)
        task_id, held_body = str(held["task_id"]), held["body"]
    except (ValueError, TypeError, KeyError):
        raise SpecError("Idempotency-Key: the record of this key is unreadable; use a new key") from None
    if held_body != body:
        raise IdempotencyConflict(task_id)
    return task_id


def check_room(
    client: redis.Redis,
    limit: int | None,
    queues: Sequence[str],
    models: Sequence[str],
    tenants: Sequence[str] = (DEFAULT_TENANT,),
) -> None:
    """Raise `QueueFull` if sending one job to each of `queues` (the queue of each job's model in `models`) would
    make any queue hold more than `limit` jobs, counting every tenant's lists of it; one pipelined round trip. No
    limit: nothing is read."""
    if limit is None or not queues:
        return
    adding = Counter(queues)
    model_of = dict(zip(queues, models, strict=True))
    counts = waiting(client, adding, tenants)
    for queue in sorted(adding):
        queued = sum(counts[queue, tenant] for tenant in tenants)
        if queued + adding[queue] > limit:
            raise QueueFull(model_of[queue], queued, limit, RETRY_AFTER_SECONDS)


def waiting(client: redis.Redis, queues: Iterable[str], tenants: Iterable[str]) -> dict[tuple[str, str], int]:
    """Jobs waiting in each of `queues` (base queue names) for each of `tenants`, every priority, by (queue, tenant):
    one pipelined round trip."""
    pairs = [(queue, tenant) for queue in sorted(set(queues)) for tenant in dict.fromkeys(tenants)]
    lengths = client.pipeline(transaction=False)
    for queue, tenant in pairs:
        for lst in priority_lists(tenant_queue(queue, tenant)).values():
            lengths.llen(lst)
    replies = [int(n) for n in lengths.execute()]
    per = len(replies) // len(pairs) if pairs else 0
    return {pair: sum(replies[index * per : (index + 1) * per]) for index, pair in enumerate(pairs)}
