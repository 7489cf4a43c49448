"""`TaskStatus`: where a job stands, as the client reads it and a batch counts it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from producer.keys import tenant_of
from producer.manifest import Manifest

State = Literal["unknown", "queued", "started", "progress", "succeeded", "interrupted", "revoked", "failed", "expired"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "interrupted", "revoked", "failed", "expired"})
STATES: tuple[str, ...] = get_args(State)
"""Every state, in the order above (what a listing's `status` filter accepts)."""


@dataclass(frozen=True)
class TaskStatus:
    """Where a job stands. `step`/`total` while it renders, and `frame`, the storage URL of the newest step frame
    stored (a job with a `frames` callback); `manifest` once it is final; `error` if it failed or expired.
    `submitted_at` (epoch seconds) where the reader knew it cheaply (`RenderClient.jobs`); `waiting`, for a queued
    job, why no worker can start it now (AI Horde's `is_possible`)."""

    task_id: str
    state: State
    step: int | None = None
    total: int | None = None
    manifest: Manifest | None = None
    error: str | None = None
    frame: str | None = None
    submitted_at: float | None = None
    waiting: str | None = None  # why a queued job cannot start now, e.g. "no live worker serves tiny-sdxl"

    @property
    def tenant(self) -> str:
        """The tenant the job belongs to (its id says: `team-a@<id>`; `default` for a bare id)."""
        return tenant_of(self.task_id)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL
