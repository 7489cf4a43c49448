"""The one storage interface: put, get and url of objects named relative to a base URL."""

from __future__ import annotations

from abc import ABC, abstractmethod

from producer.errors import StorageError


def check_name(name: str) -> str:
    """Reject names that could escape the base: absolute, `..`, backslashes, control characters."""
    if not name:
        raise StorageError("object name is empty")
    if name.startswith("/") or "\\" in name:
        raise StorageError(f"object name {name!r} must be relative and use '/' separators")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StorageError(f"object name {name!r} contains a control character")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise StorageError(f"object name {name!r} has an empty, '.' or '..' segment")
    return name


class Storage(ABC):
    """Objects under one base URL (`file:///dir` or `s3://bucket/prefix`). Safe to use from several threads."""

    base_url: str

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        """Store `data` as `name`, replacing any object of that name; return its URL."""
        self._put(check_name(name), data, content_type, metadata or {})
        return self.url(name)

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        return self._get(check_name(name))

    def url(self, name: str) -> str:
        return f"{self.base_url}/{check_name(name)}"

    @abstractmethod
    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    @abstractmethod
    def _get(self, name: str) -> bytes | None: ...
