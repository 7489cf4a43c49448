"""kombu's Redis transport, hardened for a queue anyone with Redis write access can push to.

kombu decodes each item it pops from the queue list as JSON inside the worker's event loop, and a
non-JSON item (`LPUSH render garbage`) raises out of that loop: the consumer dies and the worker
stops serving. Here such an item is logged and dropped, and the loop goes on. (Items that are JSON
but not a task message already get Celery's own "Received invalid task message" handling.)
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

log = logging.getLogger(__name__)

_UNDECODABLE = (ValueError, TypeError, KeyError, AttributeError)  # JSONDecodeError, UnicodeDecodeError, non-dicts


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except _UNDECODABLE as exc:
            _dropped(exc)
            raise Empty() from None

    def _get(self, queue: Any, timeout: Any = None) -> Any:  # kombu's Redis _get takes the queue only
        try:
            return super()._get(queue)  # type: ignore[no-untyped-call]
        except _UNDECODABLE as exc:
            _dropped(exc)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel


def _dropped(exc: BaseException) -> None:
    log.error("dropped an item on the queue that is not a task message (%s: %s)", type(exc).__name__, exc)
