"""`reaching`: the one error a client gives when the farm's Redis is away, whichever library noticed it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from celery.exceptions import BackendError
from kombu.exceptions import OperationalError
from kombu.utils.url import sanitize_url

from producer.errors import FarmUnavailable


def redacted(url: str) -> str:
    """The Redis URL without its password (kombu's sanitizer, as Celery's own logs use), for messages and logs."""
    return str(sanitize_url(url, mask="***"))


@contextlib.contextmanager
def reaching(redis_url: str) -> Iterator[None]:
    """Turn the many ways Redis can be away (redis-py, kombu, Celery's backend) into one `FarmUnavailable`."""
    try:
        yield
    except (redis.RedisError, OperationalError, BackendError, ConnectionError, TimeoutError) as exc:
        cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ else exc
        raise FarmUnavailable(
            f"cannot reach the farm's Redis at {redacted(redis_url)} "
            f"({type(cause).__name__}: {cause}); check that it is up and RENDER_REDIS_URL"
        ) from exc
