"""The signals that stop a render from inside its denoising loop: raised by step hooks, caught by `render()`.

They are the worker's own control flow, never errors a client sees: a revoked job ends `revoked` with a
manifest, and a job whose lease was lost leaves no trace for the worker that now owns it.
"""

from __future__ import annotations


class JobStopped(Exception):
    """Raised inside the step callback to leave the denoising loop before the VAE decode."""

    def __init__(self, reason: str, steps_completed: int) -> None:
        super().__init__(f"job stopped ({reason}) after {steps_completed} step(s)")
        self.reason = reason
        self.steps_completed = steps_completed


class JobRevoked(JobStopped):
    """Raised when the job's revocation key is set."""

    def __init__(
        self, steps_completed: int, *, revoked_at: float | None = None, steps_after_revoke: int | None = None
    ) -> None:
        super().__init__("revoked", steps_completed)
        self.revoked_at = revoked_at  # epoch seconds the revoke was written, when known
        self.steps_after_revoke = steps_after_revoke


class JobExpired(JobStopped):
    """Raised when the GPU would take a job whose `deadline_seconds` passed before it started: it ends `expired`,
    with no step run and nothing stored but its manifest."""

    def __init__(self, deadline_seconds: float) -> None:
        super().__init__("expired", 0)
        self.deadline_seconds = deadline_seconds

    @property
    def error(self) -> str:
        """The manifest's `error`."""
        return f"deadline of {self.deadline_seconds:g} s passed before a worker started it"


class LeaseLost(JobStopped):
    """Raised when this worker no longer holds the job's lease: another worker may own the job now.

    The render stops and writes nothing: no images, no manifest, no state.
    """

    def __init__(self, steps_completed: int, key: str) -> None:
        super().__init__(f"lease {key} lost", steps_completed)


class TimeLimitExceeded(JobStopped):
    """Raised at the first step past the job's hard time limit (`RENDER_TASK_TIME_LIMIT`); the job ends `failed`."""

    def __init__(self, steps_completed: int, limit: float) -> None:
        super().__init__(f"past its time limit of {limit:.0f} s", steps_completed)
        self.limit = limit


class HandedOff(JobStopped):
    """Raised when a draining worker (SIGTERM) gives the job back to its queue: it goes on elsewhere, from its
    checkpoint; this delivery writes no state and no manifest."""

    def __init__(self, steps_completed: int) -> None:
        super().__init__("handed off: the worker is shutting down", steps_completed)
