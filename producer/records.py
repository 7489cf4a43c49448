"""The values stored under the farm's Redis keys and queues, each written and read here (arq keeps a job's serialized
form in one place the same way).

- `TaskMessage`: the `render.run` message, built by a submit, by a worker that hands its job back, and by the
  recovery scan that sends a dead worker's job again (from the job's running record, `TaskMessage.running`); read
  by the worker's task from what Celery delivered.
- `Progress`: a running job's step, the meta of its Celery `PROGRESS` state.
- `Revocation`: the value of `render:revoked:<id>` and the notice pushed to the worker running the job.
- `WorkerInfo`: a worker's advert, the hash `render:worker:<hostname>` (read by `producer.fleet`, written by the
  worker's heartbeat and its render process).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from celery import Celery

from producer.keys import ATTEMPT_HEADER, LOAD_FAILURES_HEADER, SUBMITTED_AT_HEADER, TASK_RENDER


@dataclass(frozen=True)
class TaskMessage:
    """One `render.run` message: the job (its id and spec as JSON), where it goes, and the headers that travel with
    it (when it was first submitted, which attempt this is, how many workers failed to load its model)."""

    task_id: str
    spec: str
    queue: str | None
    priority: int | None
    submitted_at: float | None
    attempt: int = 1
    load_failures: int = 0

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {SUBMITTED_AT_HEADER: self.submitted_at, ATTEMPT_HEADER: self.attempt}
        if self.load_failures:
            headers[LOAD_FAILURES_HEADER] = self.load_failures
        return headers

    def send(self, app: Celery, *, producer: Any = None) -> None:
        """Publish it on its queue at its priority (through `producer`, e.g. one of `Producer.batch()`, if given)."""
        app.send_task(
            TASK_RENDER,
            args=[self.spec],
            task_id=self.task_id,
            queue=self.queue,
            priority=self.priority,
            producer=producer,
            headers=self.headers(),
        )

    def again(self, **changes: Any) -> TaskMessage:
        """The same job as its next attempt (`changes` to any other field, e.g. `load_failures`)."""
        return replace(self, attempt=self.attempt + 1, **changes)

    @classmethod
    def received(cls, request: Any, spec: str, *, queue: str | None = None) -> TaskMessage:
        """The message as a worker's task received it (Celery's `task.request`); `queue` where the delivery does
        not say which queue it came from."""
        info = request.delivery_info or {}
        return cls.with_headers(request.id, spec, info.get("routing_key") or queue, info.get("priority"), request)

    @classmethod
    def with_headers(
        cls, task_id: str, spec: str, queue: str | None, priority: int | None, headers: Any
    ) -> TaskMessage:
        """The message of `task_id` whose headers (anything with `get`: a dict, Celery's request) are `headers`."""
        submitted = headers.get(SUBMITTED_AT_HEADER)
        return cls(
            task_id=task_id,
            spec=spec,
            queue=queue,
            priority=priority,
            submitted_at=float(submitted) if submitted is not None else None,
            attempt=int(headers.get(ATTEMPT_HEADER) or 1),
            load_failures=int(headers.get(LOAD_FAILURES_HEADER) or 0),
        )

    def running(self, worker: str) -> dict[str, Any]:
        """The job's record in `render:running` while `worker` (`host:pid`) runs it (its lease adds its token): what
        the recovery scan needs to send it again (`from_running`), and where a revoke finds the worker."""
        return {
            "spec": self.spec,
            "queue": self.queue,
            "priority": self.priority,
            "attempt": self.attempt,
            "submitted_at": self.submitted_at,
            "load_failures": self.load_failures,
            "worker": worker,
        }

    @classmethod
    def from_running(cls, task_id: str, record: dict[str, Any]) -> TaskMessage:
        """The message of a running job, from its record (`running`; older workers' records lack `load_failures`)."""
        return cls(
            task_id=task_id,
            spec=record["spec"],
            queue=record.get("queue"),
            priority=record.get("priority"),
            submitted_at=record.get("submitted_at"),
            attempt=int(record.get("attempt") or 1),
            load_failures=int(record.get("load_failures") or 0),
        )

    def encode(self) -> str:
        """As JSON, keys sorted: the same message always encodes to the same text (`render:unsent` members)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> TaskMessage:
        return cls(**json.loads(raw))


PROGRESS_STATE = "PROGRESS"
"""The Celery state of a job whose steps are under way; its meta is a `Progress`."""


@dataclass(frozen=True)
class Progress:
    """A running job's progress: `step` of `total` denoising steps done, and the storage URL of the newest step
    frame stored so far (None: the job makes no frames, or none is stored yet)."""

    step: int
    total: int
    frame: str | None = None

    def meta(self) -> dict[str, int | str | None]:
        return {"step": self.step, "total": self.total, "frame": self.frame}

    @classmethod
    def from_meta(cls, info: Any) -> Progress | None:
        """The progress in a `PROGRESS` state's meta; None when it holds none."""
        if not isinstance(info, dict):
            return None
        try:
            frame = info.get("frame")
            return cls(int(info["step"]), int(info["total"]), frame if isinstance(frame, str) else None)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Revocation:
    """A revoke made at `at` (epoch seconds): `value()` is what `render:revoked:<id>` holds, `notice()` what is pushed
    on the revocations channel of the worker running `task_id`."""

    at: float | None
    task_id: str | None = None

    def value(self) -> str:
        return json.dumps({"at": self.at})

    def notice(self) -> str:
        return json.dumps({"task_id": self.task_id, "at": self.at})

    @classmethod
    def read(cls, raw: Any) -> Revocation | None:
        """A key's value or a notice as written by `value` / `notice`; None when `raw` is neither."""
        try:
            data = json.loads(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        try:
            at = float(data["at"]) if data.get("at") is not None else None
        except (TypeError, ValueError):
            at = None
        task_id = data.get("task_id")
        return cls(at, str(task_id) if task_id is not None else None)


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker as its advert (`render:worker:<hostname>`, a hash) says: what it serves, what is loaded, the
    job in hand and its step, when it was last seen. The worker writes the hash in three parts, each through one of
    the `*_fields` below: its heartbeat (`beat_fields`), the job in hand (`job_fields`) and the models loaded
    (`load_fields`); a reader parses the whole hash (`from_hash`)."""

    hostname: str
    models: list[str]
    loaded: list[str]
    queues: list[str]
    job: str | None
    step: int | None
    total: int | None
    loads: dict[str, int]
    last_seen: float
    started_at: float | None
    pid: int | None
    ttl: float | None
    families: dict[str, str] = field(default_factory=dict)  # model -> family; empty from workers before families
    compiled: dict[str, float] = field(default_factory=dict)  # model -> seconds its compile and warm-up took

    @classmethod
    def from_hash(cls, fields: dict[Any, Any]) -> WorkerInfo:
        """Parse a worker's hash; fields a worker has not written yet read as empty or None."""
        raw = {text(k): text(v) for k, v in fields.items()}

        def number(name: str, kind: type[Any]) -> Any:
            value = raw.get(name) or None
            return kind(value) if value is not None else None

        return cls(
            hostname=raw.get("hostname", ""),
            models=list(json.loads(raw.get("models") or "[]")),
            loaded=list(json.loads(raw.get("loaded") or "[]")),
            queues=list(json.loads(raw.get("queues") or "[]")),
            job=raw.get("job") or None,
            step=number("step", int),
            total=number("total", int),
            loads={str(k): int(v) for k, v in json.loads(raw.get("loads") or "{}").items()},
            last_seen=number("last_seen", float) or 0.0,
            started_at=number("started_at", float),
            pid=number("pid", int),
            ttl=number("ttl", float),
            families={str(k): str(v) for k, v in json.loads(raw.get("families") or "{}").items()},
            compiled={str(k): float(v) for k, v in json.loads(raw.get("compiled") or "{}").items()},
        )

    @staticmethod
    def beat_fields(
        hostname: str,
        *,
        models: list[str],
        queues: list[str],
        families: dict[str, str] | None = None,
        pid: int,
        started_at: float,
        last_seen: float,
        ttl: float,
    ) -> dict[str, str | int | float]:
        """The fields each heartbeat writes."""
        return {
            "hostname": hostname,
            "models": json.dumps(models),
            "queues": json.dumps(queues),
            "families": json.dumps(families or {}, sort_keys=True),
            "pid": pid,
            "started_at": started_at,
            "last_seen": last_seen,
            "ttl": ttl,
        }

    @staticmethod
    def job_fields(job: str | None) -> dict[str, str]:
        """The job now in hand (None: none), its step not known yet; empty fields read as None."""
        return {"job": job or "", "step": "", "total": ""}

    @staticmethod
    def progress_fields(step: int, total: int) -> dict[str, str]:
        """The job in hand reached `step` of `total`."""
        return {"step": str(step), "total": str(total)}

    @staticmethod
    def load_fields(
        loaded: list[str], loads: dict[str, int], compiled: dict[str, float] | None = None
    ) -> dict[str, str]:
        """The models loaded in the render process, how often each was loaded, and what compiling each took."""
        fields = {"loaded": json.dumps(loaded), "loads": json.dumps(loads, sort_keys=True)}
        return fields | {"compiled": json.dumps(compiled or {}, sort_keys=True)}


def text(value: Any) -> str:
    """A Redis reply's bytes (or anything) as text; bytes that are not UTF-8 are replaced, never raised on."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
