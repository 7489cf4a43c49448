"""Redis ACL users, one per role, each allowed what its process really does (found by running each under its user
and reading `ACL LOG`, not guessed): least privilege on the farm's Redis (docs/operations.md).

- `producer.<tenant>`: an application submitting as a declared tenant: its own jobs' keys, queues and submit keys
  (`owned_key_patterns`), the farm's tenants and live workers read-only, the Celery messages a submit and a revoke
  send. Not another tenant's anything, not leases, not `render:running`, no event stream.
- `service`: the HTTP service (`render serve`): what a producer may, for every tenant (the service checks each API
  key's tenant in code), and the default tenant's keys. No leases, no admin commands.
- `worker`: the GPU workers: every key and channel, scripts, pub/sub; no admin commands.
- `monitor`: Flower and `render workers`: read-only keys, INFO, the event stream, and Celery's remote-control
  broadcast (inspect) with its replies.

`roles` lists a farm's roles; `apply` sets them on a server (`ACL SETUSER`, `setuser_args`), `acl_file` writes them
as an ACL file (`aclfile`). Passwords go to Redis as SHA-256 hashes (`#<hex>`), never as text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

from producer.keys import (
    DEFAULT_TENANT,
    KEY_PREFIX,
    TENANT_SEPARATOR,
    TENANTS,
    WORKERS,
    revocations_channel,
    tenant_key,
    tenant_queue,
)

PASSWORD_ENV = "RENDER_ACL_PASSWORD_"
"""A role's password comes from `RENDER_ACL_PASSWORD_<ROLE>`: WORKER, SERVICE, MONITOR, PRODUCER_<TENANT> (the
tenant's name upper-cased, `-` as `_`)."""

# redis-py names its library on connecting (CLIENT SETINFO, Redis 7.2 on; an error before is ignored); a rule naming
# it is refused by older servers, so `apply` leaves it out there.
_SETINFO = "+client|setinfo"
# What every client does on connecting and to stay connected (redis-py's and kombu's handshakes, health checks).
_CONNECTION = ("+ping", "+echo", "+hello", "+auth", "+select", "+quit", "+reset", "+client|setname", _SETINFO)

# Celery's fanout exchanges on Redis are pub/sub channels named `/<db>.<exchange>[/<routing key>]` (kombu's
# fanout_prefix and fanout_patterns): task events (`celeryev`) and the remote-control broadcast (`celery.pidbox`).
_EVENTS_CHANNEL = "/*.celeryev/*"
_BROADCAST_CHANNEL = "/*.celery.pidbox*"
_BROADCAST_BINDING = "_kombu.binding.celery.pidbox"
# The reply queue of one inspect call: kombu names it `<uuid>.reply.celery.pidbox` (a priority suffix on its lists);
# the uuid's shape keeps the pattern off every key a job id could make.
_REPLY_LISTS = "????????-????-????-????-????????????.reply.celery.pidbox*"

# What a producer sends, as MONITOR showed it under a submit (record, index, idempotency key and staged message in
# one transaction; the kombu message), a batch, status and job listing reads, a wait, and revokes (key, notice, the
# queue's cleanup); plus EVAL (an idempotency key's release after a failed submit) and EXISTS (the HTTP service's
# replay check), which those paths take only on their rarer branches.
_PRODUCER_COMMANDS = (
    "+get", "+mget", "+set", "+del", "+exists", "+expire",
    "+hget", "+hmget", "+hgetall", "+hkeys", "+hset", "+hsetnx",
    "+zadd", "+zrem", "+zcount", "+zrangebyscore", "+zrevrangebyscore", "+zremrangebyscore", "+zremrangebyrank",
    "+zmscore",
    "+lpush", "+llen", "+lrange", "+lrem",
    "+sadd",
    "+multi", "+exec", "+eval",
    "+publish",
)  # fmt: skip


@dataclass(frozen=True)
class Role:
    """One ACL user: its name, the password variable it is made from, and its rules (ACL SETUSER's syntax)."""

    user: str
    password_env: str
    rules: tuple[str, ...]


def producer_role(tenant: str, queue: str, tenants: Iterable[str] = ()) -> Role:
    """An application submitting as `tenant` (a declared tenant, not `default`); `tenants`: every declared tenant,
    whose queues' lengths RENDER_MAX_QUEUED counts."""
    own = owned_key_patterns(tenant, queue)
    lengths = [f"%R~{pattern}" for t in sorted({DEFAULT_TENANT, tenant, *tenants}) for pattern in queue_lists(t, queue)]
    rules = (
        *(f"~{pattern}" for pattern in own),
        *(f"%R~{name}" for name in _shared_reads()),
        f"&{_EVENTS_CHANNEL}",  # task-sent events (task_send_sent_event): publish only, no subscribe below
        f"&{_BROADCAST_CHANNEL}",  # Celery's `control.revoke` broadcast
        f"%R~{_BROADCAST_BINDING}",
        f"&{revocations_channel('*')}",  # the notice to the worker rendering a revoked job
        *_CONNECTION,
        *_PRODUCER_COMMANDS,
        # Following a job wakes on its result's channel: SUBSCRIBE to its own jobs' only, never to the events.
        f"(+subscribe +unsubscribe &celery-task-meta-{tenant}{TENANT_SEPARATOR}*)",
        # RENDER_MAX_QUEUED bounds a model's queue over every tenant: the lengths of their lists, not their content.
        f"(+llen {' '.join(lengths)})",
    )
    return Role(f"producer.{tenant}", password_env(f"producer_{tenant}"), rules)


def service_role(tenants: Iterable[str], queue: str) -> Role:
    """The HTTP service: every tenant's jobs (and the default tenant's), as a producer of each."""
    keys = [
        f"{KEY_PREFIX}:job:*",
        f"{KEY_PREFIX}:manifest:*",
        f"{KEY_PREFIX}:revoked:*",
        f"{KEY_PREFIX}:webhook:*",
        "celery-task-meta-*",
        f"{KEY_PREFIX}:t:*",
        *(tenant_key(DEFAULT_TENANT, name) for name in ("unsent", "jobs", "deadlines", "idem:*", "batch:*")),
        *queue_patterns(DEFAULT_TENANT, queue),
    ]
    for tenant in sorted(set(tenants) - {DEFAULT_TENANT}):
        keys += queue_patterns(tenant, queue)
    rules = (
        *(f"~{pattern}" for pattern in keys),
        *(f"%R~{name}" for name in _shared_reads()),
        f"&{_EVENTS_CHANNEL}",
        f"&{_BROADCAST_CHANNEL}",
        f"%R~{_BROADCAST_BINDING}",
        f"&{revocations_channel('*')}",
        *_CONNECTION,
        *_PRODUCER_COMMANDS,
        "(+subscribe +unsubscribe &celery-task-meta-*)",
    )
    return Role("service", password_env("service"), rules)


def worker_role() -> Role:
    """The GPU workers: the whole keyspace and every channel (kombu, leases, recovery, scripts, pub/sub), but no
    command that reconfigures, empties or stops the server, or reads or changes its users."""
    rules = (
        "~*",
        "&*",
        "+@all",
        "-@dangerous",
        "+info",  # kombu and Celery read the server's version
        "+client|id",
        "-script|flush",
        "-script|kill",
        "-function",
    )
    return Role("worker", password_env("worker"), rules)


def monitor_role() -> Role:
    """Flower and `render workers`: read every key, INFO, subscribe to the events; and Celery's inspect: publish
    the broadcast, and the reply queue Flower declares (a binding) and pops its workers' replies from."""
    rules = (
        "%R~*",
        "&*",
        "+@read",
        "-@dangerous",
        "+info",
        *_CONNECTION,
        "+subscribe",
        "+psubscribe",
        "+unsubscribe",
        "+punsubscribe",
        "+publish",
        # Flower's event receiver and its inspect replies are kombu queues of its own: declaring one adds its
        # binding, closing one deletes its list; the workers' replies are popped off their lists.
        "~_kombu.binding.celeryev",
        "~_kombu.binding.reply.celery.pidbox",
        "~_kombu.binding_permanent.celeryev",
        "~_kombu.binding_permanent.reply.celery.pidbox",
        "~_kombu.binding_deadlines",  # kombu's expiry of the queues it declares with a TTL (the reply queue)
        "~celeryev.*",
        f"~{_REPLY_LISTS}",
        "+sadd",
        "+srem",
        "+del",
        "+brpop",
        "+rpop",
        "+multi",
        "+exec",
        # Started as `celery -A worker.celery_app flower`, Flower pops replies with the workers' hardened transport:
        # its POP script (worker.process.fairshare), which records each delivery in kombu's unacked hash and index
        # (and a list's fair-share turn) as a BRPOP's receipt would. Flower on the stock transport (compose's) needs
        # none of these; the unacked hash is readable to this role anyway.
        "+evalsha",
        "+script|load",
        "+script|exists",
        "+blmove",  # its wait between polls: the list onto itself, popping nothing
        "~unacked",
        "~unacked_index",
        f"~{KEY_PREFIX}:fair:{_REPLY_LISTS}",
        "+hset",
        "+hdel",
        "+zadd",
        "+zrem",
        # kombu's stock transport (compose's Flower) restores timed-out deliveries from every consumer, under a
        # lock: the lock it may take; the restore itself (a push back onto a job queue) it may not, so a monitor
        # never requeues a job a worker still renders.
        "~unacked_mutex",
        "+set",
        "+watch",
        "+unwatch",
        "+time",  # kombu's script that renews a declared queue's expiry reads the server's clock
    )
    return Role("monitor", password_env("monitor"), rules)


def owned_key_patterns(tenant: str, queue: str) -> list[str]:
    """The Redis key patterns of what `tenant`'s producers may read and write (its jobs' records, results,
    revocation keys, webhooks, its queues and their kombu bindings, its submit structures), for its ACL user
    (`producer_role`). Not leases, not running records, not another tenant's anything. A declared tenant only: the
    default tenant's keys cannot be told from the others' by a pattern."""
    if tenant == DEFAULT_TENANT:
        raise ValueError("the default tenant's keys have no prefix of their own; give the application a tenant")
    scoped = f"{tenant}{TENANT_SEPARATOR}"
    return [
        f"{KEY_PREFIX}:job:{scoped}*",
        f"{KEY_PREFIX}:manifest:{scoped}*",
        f"{KEY_PREFIX}:revoked:{scoped}*",
        f"{KEY_PREFIX}:webhook:{scoped}*",
        f"celery-task-meta-{scoped}*",
        f"{tenant_key(tenant, '')}*",
        f"{scoped}{queue}*",
        f"_kombu.binding.{scoped}{queue}*",
        f"_kombu.binding_permanent.{scoped}{queue}*",
    ]


def queue_lists(tenant: str, queue: str) -> list[str]:
    """The key patterns of `tenant`'s lists of `queue` (every model, every priority)."""
    name = tenant_queue(queue, tenant)
    return [name, f"{name}.*"]


def queue_patterns(tenant: str, queue: str) -> list[str]:
    """`queue_lists` and their kombu bindings."""
    return [
        *queue_lists(tenant, queue),
        *(
            f"_kombu.{kind}.{pattern}"
            for kind in ("binding", "binding_permanent")
            for pattern in queue_lists(tenant, queue)
        ),
    ]


def _shared_reads() -> list[str]:
    """What producers read and no one's secret: the declared tenants, the live workers and the models served."""
    return [TENANTS, WORKERS, f"{KEY_PREFIX}:worker:*", f"{KEY_PREFIX}:model:*"]


def password_env(role: str) -> str:
    return PASSWORD_ENV + role.upper().replace("-", "_")


def roles(tenants: Iterable[str], queue: str) -> list[Role]:
    """Every role of a farm with `tenants` declared (`default` gets no producer user: give applications tenants)."""
    named = sorted(set(tenants) - {DEFAULT_TENANT})
    made = [worker_role(), service_role(named, queue), monitor_role(), *(producer_role(t, queue, named) for t in named)]
    variables = [role.password_env for role in made]
    clashing = sorted({v for v in variables if variables.count(v) > 1})
    if clashing:
        raise ValueError(
            f"tenants whose names differ only by '-' and '_' share a password variable ({', '.join(clashing)}); "
            "rename one of them"
        )
    return made


def hashed(password: str) -> str:
    """A password as an ACL rule: `#<sha256>`, so the text itself never reaches Redis, its logs or a file."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def passwords(made: Iterable[Role], env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each role's password from its variable; roles whose variable is unset or empty are left out."""
    return {role.user: env[role.password_env] for role in made if env.get(role.password_env)}


Version = tuple[int, int]
NEWEST: Version = (7, 2)


def setuser_args(role: Role, password: str, server: Version = NEWEST) -> list[str]:
    """ACL SETUSER's arguments for `role` on a server of version `server`: everything it had is reset first, so a
    rerun removes old passwords and rights."""
    rules = [rule for rule in role.rules if server >= (7, 2) or rule != _SETINFO]
    return [role.user, "reset", "on", hashed(password), *rules]


def acl_file(
    made: Iterable[Role], secrets: Mapping[str, str], *, default_off: bool = True, server: Version = NEWEST
) -> str:
    """The text of an ACL file (Redis's `aclfile`) holding the roles of `made` that have a password in `secrets`,
    and the default user turned off unless `default_off` is False (an admin user is the operator's to add)."""
    lines = ["user default off"] if default_off else []
    for role in made:
        if role.user in secrets:
            user, _, *rules = setuser_args(role, secrets[role.user], server)  # no `reset`: a file starts empty
            lines.append(" ".join(["user", user, *rules]))
    return "\n".join(lines) + "\n"


def server_version(client: redis.Redis) -> Version:
    info: dict[str, object] = client.info("server")
    major, minor, *_ = str(info.get("redis_version", "7.2")).split(".")
    return int(major), int(minor)


def apply(admin: redis.Redis, made: Iterable[Role], secrets: Mapping[str, str], *, default_off: bool) -> list[str]:
    """Create or reset each role of `made` with a password in `secrets`, through `admin` (a connection as a user
    allowed ACL SETUSER); then turn the default user off if `default_off`. Returns the users set.

    Turning `default` off through a connection that is `default` would lock the operator out: refused."""
    whoami = admin.acl_whoami()
    if default_off and (whoami.decode() if isinstance(whoami, bytes) else str(whoami)) == "default":
        raise ValueError(
            "the admin URL logs in as the default user, which --disable-default would turn off: create an admin "
            "user first (ACL SETUSER admin on >PASSWORD ~* &* +@all) and put it in the admin URL, or pass "
            "--keep-default"
        )
    server = server_version(admin)
    done = []
    for role in made:
        if role.user in secrets:
            admin.execute_command("ACL", "SETUSER", *setuser_args(role, secrets[role.user], server))  # type: ignore[no-untyped-call]
            done.append(role.user)
    if default_off:
        admin.execute_command("ACL", "SETUSER", "default", "off")  # type: ignore[no-untyped-call]
    return done
