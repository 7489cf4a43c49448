"""Storage: one interface, two backends (a local directory and any S3 API)."""

from __future__ import annotations

from urllib.parse import urlparse

from producer.errors import StorageError
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage

__all__ = ["LocalStorage", "S3Storage", "Storage", "open_storage"]

_FORMS = "use file:///absolute/dir, a plain directory path, or s3://bucket[/prefix]"


def open_storage(url: str, *, s3_endpoint_url: str | None = None) -> Storage:
    """Open `file://...`, a plain path, or `s3://bucket/prefix`."""
    if not url:
        raise StorageError(f"storage URL is empty; {_FORMS}")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {url!r} names no bucket; {_FORMS}")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost", "."):
            raise StorageError(f"storage URL {url!r} names a host; {_FORMS}")
        return LocalStorage(("." if parsed.netloc == "." else "") + parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return LocalStorage(url)
    raise StorageError(f"storage URL {url!r} has an unknown scheme {parsed.scheme!r}; {_FORMS}")
