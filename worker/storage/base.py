"""The one storage interface: put, get and url of objects named relative to a base URL."""

from __future__ import annotations

import unicodedata
from abc import ABC, abstractmethod

from producer.errors import StorageError


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

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        """Store `data` as `name`, replacing any object of that name; return its URL."""
        self._put(check_name(name), data, content_type, metadata or {})
        return self.url(name)

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        return self._get(check_name(name))

    def url(self, name: str) -> str:
        """`base_url + "/" + name`."""
        return f"{self.base_url}/{check_name(name)}"

    @abstractmethod
    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    @abstractmethod
    def _get(self, name: str) -> bytes | None: ...
