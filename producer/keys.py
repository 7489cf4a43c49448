"""Every Redis key, queue name, task name and storage object name, spelled once."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from producer.errors import SpecError

KEY_PREFIX = "render"

TASK_RENDER = "render.run"
DEFAULT_QUEUE = "render"

Priority = Literal["high", "normal", "low"]
# kombu emulates priorities on Redis with one list per step, polled lowest number first: 0 is served first.
PRIORITIES: dict[str, int] = {"high": 0, "normal": 3, "low": 6}
PRIORITY_STEPS: list[int] = sorted(PRIORITIES.values())
DEFAULT_PRIORITY: Priority = "normal"
# kombu's default `sep` between a queue and its priority step (`render.m\x06\x163`); a printable one could occur
# in a model name and make kombu misread the list a job came from.
PRIORITY_SEPARATOR = "\x06\x16"


def model_queue(queue: str, model: str) -> str:
    """The queue of `model`'s jobs under the base queue name `queue`: only workers that serve the model consume it."""
    return f"{queue}.{model}"


def priority_lists(queue: str) -> dict[str, str]:
    """The Redis lists kombu keeps for `queue`, by priority name (the top priority's list is the bare name)."""
    return {name: queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for name, step in PRIORITIES.items()}


MANIFEST_NAME = "manifest.json"
FRAMES_DIR = "frames"
CHECKPOINT_NAME = "checkpoint.pt"


# -- tenants (producer.tenants holds their settings) ----------------------------------------------------------------
#
# A tenant's jobs carry its name in their task id (`team-a@<id>`), their queue (`team-a@render.sd15`) and their
# storage folder (`team-a@<id>/`), and its submit-time structures live under `render:t:<tenant>:`; so one Redis ACL
# user per tenant can be given exactly its own keys (producer.acl). The `default` tenant keeps the layout from before
# tenants: bare ids, bare queues, `render:<name>`.

DEFAULT_TENANT = "default"
TENANT_SEPARATOR = "@"
_TENANT_NAME = r"[a-z0-9][a-z0-9_-]{0,39}"
_TENANT = re.compile(_TENANT_NAME)

TENANTS = f"{KEY_PREFIX}:tenants"
"""Hash: tenant -> its settings as JSON (weight, max_queued, max_gpus, deadline_seconds): RENDER_TENANTS as the
workers publish it at start, read by producers and the HTTP service for quotas and default deadlines."""


def check_tenant(name: str, field: str = "RENDER_TENANT") -> str:
    """Return `name` if it is a tenant name (1-40 lowercase letters, digits, `_` or `-`, not starting with `_`/`-`);
    raise SpecError naming `field` if not."""
    if not isinstance(name, str) or not _TENANT.fullmatch(name):
        raise SpecError(
            f"{field}: {name!r} is not a tenant name; use 1-40 lowercase letters, digits, '_' or '-', starting with "
            "a letter or digit"
        )
    return name


def tenant_name(value: str) -> str:
    """`check_tenant` as a settings validator needs it: a ValueError that says what is wrong (pydantic's error says
    where: the setting, the key)."""
    try:
        return check_tenant(value, "tenant")
    except SpecError as exc:
        raise ValueError(str(exc).removeprefix("tenant: ")) from None


def scoped_id(tenant: str, task_id: str) -> str:
    """The id of `task_id` as `tenant`'s job: `<tenant>@<id>`, or the id itself for the default tenant and for an id
    already scoped to `tenant`. An id scoped to another tenant raises SpecError."""
    owner = tenant_of(task_id)
    if owner == tenant:
        return task_id
    if owner != DEFAULT_TENANT:
        raise SpecError(f"task_id: {task_id!r} belongs to tenant {owner!r}, not to this client's tenant {tenant!r}")
    return task_id if tenant == DEFAULT_TENANT else f"{tenant}{TENANT_SEPARATOR}{task_id}"


def tenant_of(name: str) -> str:
    """The tenant a task id or a queue name belongs to: what comes before its `@`, else `default`."""
    owner, separator, _ = name.partition(TENANT_SEPARATOR)
    return owner if separator else DEFAULT_TENANT


def unscoped(name: str) -> str:
    """A task id or queue name without its tenant: `team-a@render.sd15` -> `render.sd15`."""
    return name.partition(TENANT_SEPARATOR)[2] or name


def tenant_queue(queue: str, tenant: str) -> str:
    """The queue `tenant`'s jobs for `queue` wait in: `<tenant>@<queue>`, or `queue` itself for the default tenant.
    Workers consume `queue` and take from every tenant's list of it in weighted turn (worker.process.fairshare)."""
    return queue if tenant == DEFAULT_TENANT else f"{tenant}{TENANT_SEPARATOR}{queue}"


def tenant_key(tenant: str, name: str) -> str:
    """A key `tenant`'s submits write (`unsent`, `jobs`, `deadlines`, `idem:<sha>`, `batch:<name>`):
    `render:t:<tenant>:<name>`, or `render:<name>` for the default tenant."""
    return f"{KEY_PREFIX}:{name}" if tenant == DEFAULT_TENANT else f"{KEY_PREFIX}:t:{tenant}:{name}"


def unsent_key(tenant: str) -> str:
    """Sorted set of the tenant's staged messages (`render:unsent` for the default tenant)."""
    return tenant_key(tenant, "unsent")


def job_index_key(tenant: str) -> str:
    """Sorted set: the tenant's task ids -> when submitted (ms); what `RenderClient.jobs` lists (`render:jobs`)."""
    return tenant_key(tenant, "jobs")


def deadlines_key(tenant: str) -> str:
    """Sorted set: the tenant's task ids with a deadline -> when it passes (epoch seconds): what the recovery scan
    reads to expire jobs still queued past it (worker.process.expiry)."""
    return tenant_key(tenant, "deadlines")


def fair_key(lst: str) -> str:
    """Sorted set: tenant -> its pass in the weighted turn of one priority list of one queue (worker only)."""
    return f"{KEY_PREFIX}:fair:{lst}"


def gpus_key(tenant: str) -> str:
    """Sorted set: task id -> when a worker took it, for every job of `tenant` a worker holds (`max_gpus`)."""
    return f"{KEY_PREFIX}:gpus:{tenant}"


_TASK_ID = re.compile(rf"(?:{_TENANT_NAME}{TENANT_SEPARATOR})?[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")


def check_task_id(task_id: str, field: str = "task_id") -> str:
    """Return `task_id` if it is safe as an object prefix and a key part; raise SpecError naming `field` if not.

    Task ids become storage paths (`<task_id>/image-0.png`), so `../x`, `a/b` or an empty id are refused.
    """
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise SpecError(
            f"{field}: {task_id!r} is not a valid task id; use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (or leave it out for a generated one)"
        )
    return task_id


def revoked_key(task_id: str) -> str:
    """Redis key whose presence tells a worker to stop `task_id`."""
    return f"{KEY_PREFIX}:revoked:{task_id}"


def revocations_channel(worker: str) -> str:
    """Pub/sub channel on which `revoke` tells `worker` (the `worker` of a job's record in `render:running`, a
    worker process's `host:pid`) that one of its jobs is revoked; the revocation key stays the durable record."""
    return f"{KEY_PREFIX}:revocations:{worker}"


def lease_key(task_id: str) -> str:
    """Redis key a running task renews while it renders."""
    return f"{KEY_PREFIX}:lease:{task_id}"


def active_list(queue: str | None) -> str:
    """Redis list of the task ids leased from `queue` (one entry per running job, held or denoising): what an
    autoscaler that reads list lengths (KEDA's redis scaler) counts, so it never scales a running job's worker to
    zero. Pushed with the lease, removed with its release or by the recovery scan that re-enqueues a dead job. One per
    model queue, whatever the tenant: a tenant's queue (`team-a@render.m`) counts on its model's list."""
    return f"{KEY_PREFIX}:active:{unscoped(queue) if queue else 'default'}"


# A job's files live in a folder named by its id: a tenant's are all under the prefix `<tenant>@`, which no default
# job's id (no `@`) and no other tenant's (names have no `@`) can begin with. (A `<tenant>/` folder would also hold
# the files of a default job whose id is the tenant's name.)


def image_object(task_id: str, index: int) -> str:
    return f"{task_id}/image-{index}.png"


def frame_object(task_id: str, steps_completed: int, extension: str, stage: str | None = None) -> str:
    """A preview frame: `frames/step-NNN` in a job's first stage (or its only one), `frames/<stage>-step-NNN` in a
    later stage (`hires`, `refiner`), NNN the step within that stage."""
    label = f"{stage}-" if stage else ""
    return f"{task_id}/{FRAMES_DIR}/{label}step-{steps_completed:03d}.{extension}"


def checkpoint_object(task_id: str) -> str:
    """A running job's latest checkpoint (what a resume needs); deleted when the job ends."""
    return f"{task_id}/{CHECKPOINT_NAME}"


def manifest_object(task_id: str) -> str:
    return f"{task_id}/{MANIFEST_NAME}"


RUNNING_TASKS = f"{KEY_PREFIX}:running"
"""Hash task_id -> JSON record (spec, queue, attempt, worker) of every task a worker is rendering."""

LEASE_DEADLINES = f"{KEY_PREFIX}:lease-deadlines"
"""Sorted set task_id -> when its lease lapses unless renewed (Redis server time, ms): the recovery scan reads
only the lapsed ones, so its cost grows with the dead jobs, not with the running ones."""

RECOVERY_TURN = f"{KEY_PREFIX}:recovery-turn"
"""Held for one `recovery_interval` by the worker whose turn it is to scan: one scan per interval for the fleet."""

UNSENT_JOBS = f"{KEY_PREFIX}:unsent"
"""Sorted set: a task message a producer staged with its job's record (JSON) -> when (epoch seconds); removed once
sent. What is left in it longer than the recovery grace, its submitter died before sending: recovery sends it."""

SUBMITTED_AT_HEADER = "render_submitted_at"
ATTEMPT_HEADER = "render_attempt"
LOAD_FAILURES_HEADER = "render_load_failures"
"""On a job handed on because its model failed to load on a worker: how many times so far (RENDER_MAX_ATTEMPTS)."""


JOB_INDEX = f"{KEY_PREFIX}:jobs"
"""Sorted set: task_id -> when it was submitted (epoch milliseconds), written with the job's record; what
`RenderClient.jobs` lists, newest first. Trimmed at each submit to the newest `JOB_INDEX_MAX` and to RESULT_TTL."""

JOB_INDEX_MAX = 100_000


def idempotency_key(key: str, tenant: str = DEFAULT_TENANT) -> str:
    """String holding the submit an idempotency key made (`producer.admission`); the key is hashed, never stored.
    Each tenant has its own keys."""
    return tenant_key(tenant, f"idem:{hashlib.sha256(key.encode()).hexdigest()}")


def job_key(task_id: str) -> str:
    """Hash the producer writes at submit time (queue, submitted_at), so a queued task is told from an unknown one."""
    return f"{KEY_PREFIX}:job:{task_id}"


def manifest_key(task_id: str) -> str:
    """The terminal manifest of a task, as JSON, for clients without storage access."""
    return f"{KEY_PREFIX}:manifest:{task_id}"


def recovery_lock_key(task_id: str) -> str:
    """Held briefly by the one worker that re-enqueues a task whose lease expired."""
    return f"{KEY_PREFIX}:recover:{task_id}"


def deaths_key(task_id: str) -> str:
    """Hash of the runs of `task_id` whose worker died (a field per lease token) and the submission they belong to
    (`submitted_at`), written by the recovery scan that finds each lapsed: the job's worker deaths, which
    `RENDER_MAX_ATTEMPTS` bounds. Drain hand-offs, which re-enqueue a job without the scan, are not in it. Lives
    `result_ttl` from the last death."""
    return f"{KEY_PREFIX}:deaths:{task_id}"


WORKERS = f"{KEY_PREFIX}:workers"
"""Sorted set: worker hostname -> time of its last heartbeat (epoch seconds)."""


def worker_key(hostname: str) -> str:
    """Hash a live worker advertises itself in (models, loaded, job, step, loads); expires without heartbeats."""
    return f"{KEY_PREFIX}:worker:{hostname}"


def model_workers_key(model: str) -> str:
    """Sorted set: hostname -> last heartbeat of every worker that serves `model` (one read tells if any is live)."""
    return f"{KEY_PREFIX}:model:{model}:workers"


WEBHOOK_OUTBOX = f"{KEY_PREFIX}:webhooks"
"""Sorted set: task_id -> time its next webhook delivery attempt is due (epoch seconds); claims push it ahead."""


def webhook_key(task_id: str) -> str:
    """Hash with a task's webhook delivery: url, body, state, attempts, last status and error, timestamps."""
    return f"{KEY_PREFIX}:webhook:{task_id}"
