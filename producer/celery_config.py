"""The Celery settings producers and workers share: one place, so both ends agree."""

from __future__ import annotations

from typing import Any

from producer.keys import DEFAULT_QUEUE, TASK_RENDER


def base_config(redis_url: str, *, queue: str = DEFAULT_QUEUE, result_ttl: int = 7 * 24 * 3600) -> dict[str, Any]:
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
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
        "broker_transport_options": {"socket_keepalive": True, "health_check_interval": 10},
    }
