"""Storage: one interface, two backends (a local directory and any S3 API)."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlparse

from producer.errors import StorageError
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage

__all__ = ["LocalStorage", "S3Storage", "Storage", "open_storage"]

_BUCKET = re.compile(r"[a-zA-Z0-9._-]{1,255}")  # botocore's own check; S3 itself is stricter
_FORMS = "use file:///absolute/dir, a plain directory path, or s3://bucket[/prefix]"


def open_storage(url: str, *, s3_endpoint_url: str | None = None, retry_seconds: float = 0.0) -> Storage:
    """Open `file:///dir`, a plain path, or `s3://bucket[/prefix]` (at `s3_endpoint_url`, or AWS when None).

    `retry_seconds`: how long an unreachable S3 endpoint is retried, with backoff, before a call fails.
    """
    if not url:
        raise StorageError(f"storage URL is empty; {_FORMS}")
    parsed = urlparse(url)
    if ".." in unquote(parsed.path).replace("\\", "/").split("/"):
        raise StorageError(f"storage URL {url!r} has a '..' segment; name the directory or prefix itself")
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return LocalStorage(url)
    if "@" in parsed.netloc:  # never echo a URL that may hold a secret
        raise StorageError(f"storage URL must not contain credentials (give them the standard AWS way); {_FORMS}")
    if parsed.query or parsed.fragment:
        raise StorageError(f"storage URL {url!r} has a query or fragment; {_FORMS}")
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {url!r} names no bucket; {_FORMS}")
        if not _BUCKET.fullmatch(parsed.netloc):
            raise StorageError(f"storage URL {url!r} names an invalid bucket {parsed.netloc!r}; {_FORMS}")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url, retry_seconds=retry_seconds)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost", "."):
            raise StorageError(f"storage URL {url!r} names a host; {_FORMS}")
        if not parsed.path:
            raise StorageError(f"storage URL {url!r} names no directory; {_FORMS}")
        return LocalStorage(("." if parsed.netloc == "." else "") + unquote(parsed.path))
    raise StorageError(f"storage URL {url!r} has an unknown scheme {parsed.scheme!r}; {_FORMS}")
