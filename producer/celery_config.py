"""The Celery settings producers and workers share: one place, so both ends agree."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.utils.url import parse_ssl_cert_reqs

from producer.keys import DEFAULT_PRIORITY, DEFAULT_QUEUE, PRIORITIES, PRIORITY_STEPS, TASK_RENDER
from producer.redis_connect import SentinelOptions, is_sentinel


class PollingRedisBackend(RedisBackend):
    """Celery's Redis result backend, minus the pub/sub subscription it opens for every task sent.

    Nothing here waits on a result through pub/sub: the client polls the stored meta, and workers that
    re-send a task never read its result. The stock backend subscribes at every `send_task` and
    unsubscribes when the `AsyncResult` is garbage-collected; if Redis has gone by then, that finalizer
    retries for about 20 s and then raises inside whatever code the collector interrupted. It also holds
    one subscription per job in flight on the farm's Redis. `AsyncResult.get()` still works: it
    subscribes when it is called.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def tls_options(redis_url: str) -> dict[str, Any]:
    """Celery's TLS settings for a `rediss://` URL, from its query (`ssl_cert_reqs`, `ssl_ca_certs`,
    `ssl_certfile`, `ssl_keyfile`), the same parameters redis-py reads; certificates are verified unless
    the URL says `ssl_cert_reqs=none`. Empty for `redis://`."""
    parsed = urlparse(redis_url)
    if parsed.scheme != "rediss":
        return {}
    query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    reqs = query.get("ssl_cert_reqs", "required")
    try:  # kombu's own reading of the parameter, so the client and the transport agree on what it means
        cert_reqs = parse_ssl_cert_reqs(reqs)
    except KeyError:
        raise ValueError(f"ssl_cert_reqs={reqs!r} in the Redis URL; use required, optional or none") from None
    options: dict[str, Any] = {"ssl_cert_reqs": cert_reqs}
    options |= {key: query[key] for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if key in query}
    return {"broker_use_ssl": options, "redis_backend_use_ssl": options}


class PollingSentinelBackend(SentinelBackend):
    """`PollingRedisBackend` through Redis Sentinel (a `sentinel://` URL)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def sentinel_options(redis_url: str, master_name: str | None, sentinel_password: str | None) -> dict[str, Any]:
    """The transport options a `sentinel://` URL needs, for the broker and the result backend alike: the master's
    name (and the sentinels' password). Empty for `redis://` and `rediss://`."""
    if not is_sentinel(redis_url):
        return {}
    options: dict[str, Any] = {"master_name": master_name}
    if sentinel_password:
        options["sentinel_kwargs"] = {"password": sentinel_password}
    return options


def sentinel_of(transport_options: dict[str, Any] | None) -> SentinelOptions:
    """The other way: `master_name` and `sentinel_password` back from a Celery app's broker transport options
    (`sentinel_options`' output), as `producer.redis_connect.connect` takes them."""
    options = transport_options or {}
    return SentinelOptions(
        master_name=options.get("master_name"),
        sentinel_password=(options.get("sentinel_kwargs") or {}).get("password"),
    )


def base_config(
    redis_url: str,
    *,
    queue: str = DEFAULT_QUEUE,
    result_ttl: int = 7 * 24 * 3600,
    master_name: str | None = None,
    sentinel_password: str | None = None,
) -> dict[str, Any]:
    backend = PollingSentinelBackend if is_sentinel(redis_url) else PollingRedisBackend
    sentinel = sentinel_options(redis_url, master_name, sentinel_password)
    return {
        "broker_url": redis_url,
        "result_backend": f"{backend.__module__}.{backend.__name__}+{redis_url}",
        # JSON only: a pickled message is refused, never executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": result_ttl,
        "result_extended": True,
        "task_default_queue": queue,
        "task_routes": {TASK_RENDER: {"queue": queue}},
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "redis_backend_health_check_interval": 10,
        # A Redis blip (a restart, a failover) is retried with backoff (10 ms doubling, about 2.5 s in all
        # here; the worker allows about 30 s for its final writes), not turned into an error at once.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 8,
        # Three priority lists per queue (high, normal, low), polled in that order; both ends must agree on the
        # steps, since the producer picks the list and the worker polls them.
        "broker_transport_options": {
            "socket_keepalive": True,
            "health_check_interval": 10,
            "priority_steps": PRIORITY_STEPS,
            **sentinel,
        },
        "task_default_priority": PRIORITIES[DEFAULT_PRIORITY],
        **({"result_backend_transport_options": sentinel} if sentinel else {}),
        **tls_options(redis_url),
    }
