"""A local directory as storage: the embedded default, and what `render local` writes by default."""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from urllib.parse import quote

from producer.errors import StorageError
from worker.storage.base import Storage


class LocalStorage(Storage):
    """Objects are files under `root`; each write is atomic (temp file, fsync, rename). Metadata is ignored."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.base_url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    def _link(self, name: str, *, index_name: str, expires: int) -> str:
        # Relative, so a page written here still finds its images after the directory is moved or copied.
        return quote(posixpath.relpath(name, posixpath.dirname(index_name) or "."))

    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._path(name)
        # A unique hidden name in the same directory, created with os.open so the umask applies (mkstemp's is 0600).
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _delete(self, name: str) -> None:
        try:
            self._path(name).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self._path(name)}: {exc.strerror or exc}") from exc

    def _get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
