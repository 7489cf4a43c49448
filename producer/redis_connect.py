"""The farm's Redis from its URL, for every client the project opens: `redis://` and `rediss://` directly,
`sentinel://` through Redis Sentinel (the master the sentinels name, found again after a failover).

A Sentinel URL lists the sentinels, `;`-separated, as Celery and kombu read it:
`sentinel://:PASSWORD@sentinel-1:26379/0;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379`, with the
master's name in RENDER_REDIS_MASTER_NAME. The password and database of the first entry are the master's; a
password the sentinels themselves require goes in RENDER_REDIS_SENTINEL_PASSWORD.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast
from urllib.parse import unquote, urlparse

import redis
from kombu.utils.url import maybe_sanitize_url
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


class SentinelOptions(TypedDict, total=False):
    """What a `sentinel://` URL needs beside it: the master's name and the sentinels' own password."""

    master_name: str | None
    sentinel_password: str | None


def is_sentinel(url: str) -> bool:
    return urlparse(url).scheme == SENTINEL_SCHEME


def sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' (host, port) and the master's connection parameters (password, username, db)."""
    hosts: list[tuple[str, int]] = []
    params: dict[str, Any] = {}
    for index, chunk in enumerate(part for part in url.split(";") if part.strip()):
        parsed = urlparse(chunk.strip())
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            shown = maybe_sanitize_url(chunk.strip())  # never a password in an error
            raise ValueError(f"{shown!r} in the Redis URL: each entry is sentinel://host:port, separated by ';'")
        hosts.append((parsed.hostname, parsed.port or SENTINEL_PORT))
        if index == 0:
            if parsed.password:
                params["password"] = unquote(parsed.password)
            if parsed.username:
                params["username"] = unquote(parsed.username)
            if parsed.path.strip("/"):
                params["db"] = int(parsed.path.strip("/"))
    return hosts, params


def connect(
    url: str, *, master_name: str | None = None, sentinel_password: str | None = None, **kwargs: Any
) -> redis.Redis:
    """A client of the farm's Redis; `kwargs` are redis-py's (timeouts, retries) and apply to the master's
    connections (and the timeouts to the sentinels')."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if not master_name:
        raise ValueError("a sentinel:// Redis URL needs the master's name: set RENDER_REDIS_MASTER_NAME")
    hosts, params = sentinel_addresses(url)
    sentinel_kwargs: dict[str, Any] = {
        key: kwargs[key] for key in ("socket_connect_timeout", "socket_timeout") if key in kwargs
    }
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master = sentinel.master_for(master_name, redis_class=redis.Redis, **params, **kwargs)  # type: ignore[no-untyped-call]
    return cast(redis.Redis, master)
