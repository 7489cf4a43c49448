"""The exception tree, complete and drawn only here. Every error this project raises on purpose is a `RenderError`.

RenderError
 ├── SpecError               the caller's input is invalid; the message names the field and the fix
 │    ├── UnsupportedSpecError    a valid spec this worker cannot run (a model without that pipeline)
 │    ├── BatchFileError          lines of a batch file are invalid: every one, as `line N: field: message`
 │    └── IdempotencyConflict     an Idempotency-Key already names a submit of another spec or priority
 ├── ConfigError             a setting (RENDER_*) is invalid
 ├── ModelError              a model or LoRA is not allowlisted, or cannot be loaded
 │    └── ModelLoadError          an allowlisted model failed to load on a worker (its files, the device's memory)
 ├── StorageError            a storage URL is invalid, or an object cannot be read or written
 │    └── StorageUnavailable      storage cannot be reached or answers a transient error, after the retries
 ├── FarmUnavailable         the client cannot reach the farm's Redis
 ├── NoWorkerForModel        submit found no live worker serving the job's model; nothing was enqueued
 ├── QueueFull               the model's queue holds RENDER_MAX_QUEUED jobs; nothing was enqueued, retry later
 │    └── QuotaExceeded           the tenant holds its `max_queued` jobs (RENDER_TENANTS); nothing was enqueued
 ├── UnknownTenant           the client's tenant (RENDER_TENANT) is not one the farm declares in RENDER_TENANTS
 ├── WaitTimeout             `wait` gave up before the job reached a final state
 └── RenderFailed            the pipeline itself failed while rendering (the cause is chained)

The signals that stop a render from inside its denoising loop (a revoke, a lost lease) are the worker's
own control flow, not errors a client sees: they live in `worker.engine.stops`.
"""

from __future__ import annotations

from typing import Any


class RenderError(Exception):
    """Raised for every error this project raises on purpose."""

    manifest: Any = None
    """For a job that failed on a worker: the `failed` manifest it stored (a `producer.Manifest`), when it could."""


class SpecError(RenderError):
    """Raised when a render spec is invalid; the message names the field and the fix."""

    @classmethod
    def from_validation(cls, exc: Any) -> SpecError:
        """Turn a pydantic ValidationError into one readable sentence per problem."""
        problems = []
        for err in exc.errors(include_url=False):
            where = _location(err["loc"])
            msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
            if err["type"] == "extra_forbidden":
                msg = "unknown field; remove it (see `render schema` for the fields a spec may have)"
            elif "input" in err and err["type"] not in ("missing", "value_error", "assertion_error"):
                msg = f"{msg}; got {_short(err['input'])}"
            problems.append(f"{where}: {msg}" if where else msg)
        # One line each, whatever the input held: control characters are shown escaped, never emitted.
        problems = ["".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in problem) for problem in problems]
        shown = problems[:1]
        for problem in problems[1:]:  # a readable sentence: the problems that fit, then how many more there are
            if len("; ".join([*shown, problem])) > _MAX_MESSAGE:
                break
            shown.append(problem)
        more = f"; and {len(problems) - len(shown)} more problem(s)" if len(shown) < len(problems) else ""
        error = cls("invalid render spec: " + "; ".join(shown) + more)
        error.problems = problems
        return error

    problems: list[str]
    """One `field: message` per problem (for a spec read from a file, each is reported with its line)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.problems = [str(args[0]) if args else ""]


class UnsupportedSpecError(SpecError):
    """Raised when a valid spec asks for something this worker cannot run."""


class ConfigError(RenderError):
    """Raised when a setting is invalid."""


class ModelError(RenderError):
    """Raised when a model is not allowlisted or cannot be loaded."""


class ModelLoadError(ModelError):
    """Raised when an allowlisted model fails to load on a worker; the worker withdraws it and hands its jobs on."""


class StorageError(RenderError):
    """Raised when a storage URL is invalid or an object cannot be read or written."""


class StorageUnavailable(StorageError):
    """Raised when storage cannot be reached or answers with a transient error (timeouts, 5xx, throttling).

    Worth retrying, unlike a missing bucket or refused credentials.
    """


class NoWorkerForModel(RenderError):
    """Raised at submit when no live worker serves the job's model; nothing is enqueued."""

    def __init__(self, model: str, served: list[str]) -> None:
        listed = ", ".join(served) if served else "none (no worker is live)"
        super().__init__(
            f"no live worker serves model {model!r}; models served now: {listed}. Start a worker with it in "
            "RENDER_MODELS, or submit with wait_for_worker=True (--queue-anyway) to queue it for one"
        )
        self.model = model
        self.served = served


class FarmUnavailable(RenderError):
    """Raised by the client when the farm's Redis cannot be reached (after a few quick retries)."""


class WaitTimeout(RenderError):
    """Raised when `wait` gives up before the job reached a final state."""


class BatchFileError(SpecError):
    """Raised when lines of a batch file are invalid; `errors` holds every one as `line N: field: message`."""

    def __init__(self, errors: list[str]) -> None:
        shown = "\n".join(errors[:50]) + (f"\n... and {len(errors) - 50} more" if len(errors) > 50 else "")
        super().__init__(f"{len(errors)} invalid line(s); nothing was submitted:\n{shown}")
        self.errors = errors
        self.problems = errors


class IdempotencyConflict(SpecError):
    """Raised when a submit's idempotency key was used before for another spec or priority; nothing is enqueued."""

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"Idempotency-Key: this key was used for another spec or priority (job {task_id}); send the same body "
            "to get that job again, or use a new key for a new job"
        )
        self.task_id = task_id


class QueueFull(RenderError):
    """Raised at submit when the model's queue already holds `RENDER_MAX_QUEUED` jobs; nothing is enqueued."""

    def __init__(self, model: str, queued: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"queue for model {model!r} is full ({queued} queued, RENDER_MAX_QUEUED={limit}); "
            f"retry in {retry_after:.0f} s"
        )
        self.model = model
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after


class QuotaExceeded(QueueFull):
    """Raised at submit when the tenant's queued jobs would pass its `max_queued` (RENDER_TENANTS); nothing is
    enqueued. A `QueueFull`, so whoever answers that (the HTTP service's 429 with Retry-After) answers this too."""

    def __init__(self, tenant: str, queued: int, adding: int, limit: int, retry_after: float) -> None:
        RenderError.__init__(
            self,
            f"tenant {tenant!r} is over its queued quota: {queued} queued + {adding} submitted > max_queued={limit} "
            f"(RENDER_TENANTS); nothing was enqueued; retry in {retry_after:.0f} s or submit fewer",
        )
        self.model = ""
        self.tenant = tenant
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after


class UnknownTenant(RenderError):
    """Raised at submit when the client's tenant is not declared by the farm (its workers' RENDER_TENANTS): no
    worker would ever take its jobs; nothing is enqueued."""

    def __init__(self, tenant: str, known: list[str]) -> None:
        super().__init__(
            f"tenant {tenant!r} (RENDER_TENANT) is not declared by this farm; its workers declare "
            f"{', '.join(known) or 'only default'}: add it to RENDER_TENANTS on the workers, or set RENDER_TENANT to "
            "one of those"
        )
        self.tenant = tenant


class RenderFailed(RenderError):
    """Raised when the pipeline fails while rendering; the cause is chained."""


_TAGGED_UNION_LISTS = ("callbacks",)
_MAX_MESSAGE = 1200


def _location(loc: tuple[Any, ...]) -> str:
    """`('callbacks', 0, 'cfg_cutoff', 'step_index')` -> `callbacks[0].step_index`."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 2 and loc[0] in _TAGGED_UNION_LISTS:
            continue  # the union's tag (`cfg_cutoff`), not a field
        else:
            name = part if isinstance(part, str) and part.isidentifier() else _short(part, 40)  # a key sent to us
            out += f".{name}" if out else name
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
