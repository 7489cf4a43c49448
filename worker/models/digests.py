"""sha256 of weight files, each file read once per version: remembered by its real path with its size and mtime.

The registry hashes LoRA files with one in memory (`FileDigests`); `render models` keeps one on disk across runs
(`worker.views.models_view.HashCache`, over the same entries). Light on purpose: no torch, so a listing stays quick.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


class FileDigests:
    """sha256 of files by real path; an entry holds the file's size, mtime_ns and digest, and is used again only
    while the file's size and mtime_ns are unchanged. `changed` says whether an entry was added since it was
    cleared."""

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None) -> None:
        self.entries: dict[str, dict[str, Any]] = entries if entries is not None else {}
        self.changed = False

    def sha256(self, file: str | Path) -> str:
        """The file's sha256 (hex): from the entries when its size and mtime_ns are those recorded, else read."""
        real = os.path.realpath(file)
        stat = os.stat(real)
        entry = self.entries.get(real)
        if (
            entry is not None
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            return str(entry["sha256"])
        digest = hashlib.sha256()
        with open(real, "rb") as reader:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
        self.entries[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        self.changed = True
        return digest.hexdigest()
