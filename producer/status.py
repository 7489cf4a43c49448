"""`TaskStatus`: where a job stands, as the client reads it and a batch counts it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from producer.manifest import Manifest

State = Literal["unknown", "queued", "started", "progress", "succeeded", "interrupted", "revoked", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "interrupted", "revoked", "failed"})


@dataclass(frozen=True)
class TaskStatus:
    """Where a job stands. `step`/`total` while it renders; `manifest` once it is final; `error` if it failed."""

    task_id: str
    state: State
    step: int | None = None
    total: int | None = None
    manifest: Manifest | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL
