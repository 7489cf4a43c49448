"""A local directory as storage: the embedded default, and what `render local` writes by default."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from producer.errors import StorageError
from worker.storage.base import Storage


class LocalStorage(Storage):
    """Objects are files under `root`; each write is atomic (temp file, fsync, rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.base_url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    def _put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(name)}: {exc.strerror or exc}") from exc
