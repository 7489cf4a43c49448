"""The one storage interface: put, get and url of objects named relative to a base URL."""

from __future__ import annotations

import logging
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from producer.errors import StorageError, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def check_name(name: str) -> str:
    """Return `name` if it is a safe relative object name; raise StorageError naming the problem otherwise."""
    if not name:
        raise StorageError("object name is empty; give a relative name such as 'task-id/image-0.png'")
    if name.startswith("/") or "\\" in name:
        raise StorageError(f"object name {name!r} must be relative and use '/' separators")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise StorageError(f"object name {name!r} contains a control character")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise StorageError(f"object name {name!r} has an empty, '.' or '..' segment")
    return name


class Storage(ABC):
    """Objects under one base URL (`file:///dir` or `s3://bucket/prefix`). Safe to use from several threads."""

    base_url: str
    """The URL objects are stored under, without a trailing slash."""
    retry_seconds: float = 0.0
    """How long `put` and `get` keep retrying a backend that is unreachable or answers with a transient error."""

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        """Store `data` as `name`, replacing any object of that name; return its URL."""
        check_name(name)
        self._retrying(lambda: self._put(name, data, content_type, metadata or {}))
        return self.url(name)

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        check_name(name)
        return self._retrying(lambda: self._get(name))

    def delete(self, name: str) -> None:
        """Remove the object `name`; nothing happens when there is none."""
        check_name(name)
        self._retrying(lambda: self._delete(name))

    def _retrying(self, call: Callable[[], T]) -> T:
        """Run `call`, retrying `StorageUnavailable` with exponential backoff (0.5 s doubling to 15 s) for
        `retry_seconds`; then raise it, saying how long it tried. Other errors (a missing bucket, refused
        credentials) are raised at once: waiting does not fix them."""
        started = time.monotonic()
        delay, attempts = 0.5, 1
        while True:
            try:
                return call()
            except StorageUnavailable as exc:
                left = self.retry_seconds - (time.monotonic() - started)
                if left <= 0:
                    if attempts == 1:
                        raise
                    took = time.monotonic() - started
                    raise StorageUnavailable(f"{exc} (gave up after {attempts} attempts over {took:.1f} s)") from exc
                log.warning("storage unavailable (attempt %d, retrying in %.1f s): %s", attempts, min(delay, left), exc)
                time.sleep(min(delay, left))
                delay, attempts = min(delay * 2, 15.0), attempts + 1

    def url(self, name: str) -> str:
        """`base_url + "/" + name`."""
        return f"{self.base_url}/{check_name(name)}"

    def link(self, name: str, *, index_name: str, expires: int) -> str:
        """A URL a browser can open from the page stored as `index_name` to reach object `name`; a signed
        link (S3) stops working after `expires` seconds."""
        return self._link(check_name(name), index_name=check_name(index_name), expires=expires)

    def name_of(self, url: str) -> str | None:
        """The name of the object at `url`, or None when `url` is not under `base_url` (or names no object)."""
        prefix = self.base_url + "/"
        if not url.startswith(prefix):
            return None
        try:
            return check_name(url[len(prefix) :])
        except StorageError:
            return None

    @abstractmethod
    def _link(self, name: str, *, index_name: str, expires: int) -> str: ...

    @abstractmethod
    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    @abstractmethod
    def _get(self, name: str) -> bytes | None: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...
