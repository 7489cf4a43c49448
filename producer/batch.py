"""Batches: many specs from a JSONL file, submitted as one named, resumable unit.

A batch's task ids derive from its name and each spec's line (`<name>.<line>`, five digits), unless a line
gives its own `task_id`; running the same batch again therefore finds its jobs. Lines already succeeded are
skipped, those queued or rendering are left alone, and failed, revoked, expired and lost ones are submitted again.

Redis holds `render:batch:<name>` (name, source, total, runs, times) and `render:batch:<name>:tasks`
(line -> task id), both living as long as results do.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from producer.errors import BatchFileError, SpecError, WaitTimeout
from producer.keys import DEFAULT_TENANT, check_task_id, tenant_key
from producer.reaching import reaching
from producer.records import text
from producer.settings import ClientSettings
from producer.spec import RenderSpec
from producer.status import TERMINAL, TaskStatus

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_LINES = 100_000
REVOKED_SUFFIX = ".r"
"""A revoked line is submitted again as `<task id>.r<run>`: Celery workers remember revoked ids for hours."""


def batch_key(name: str, tenant: str = DEFAULT_TENANT) -> str:
    """Hash describing the batch: name, source, total, runs, created_at, updated_at (each tenant has its own)."""
    return tenant_key(tenant, f"batch:{name}")


def batch_tasks_key(name: str, tenant: str = DEFAULT_TENANT) -> str:
    """Hash line -> the task id that line was last submitted as."""
    return tenant_key(tenant, f"batch:{name}:tasks")


def check_batch_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(
            f"name: {name!r} is not a valid batch name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_name(source: str, content: bytes) -> str:
    """`<file stem>-<8 hex of the content's sha256>`: the same file is the same batch, an edited one a new one."""
    stem = source.rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix(".json") if source != "-" else "stdin"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:40] or "batch"
    return f"{stem}-{hashlib.sha256(content).hexdigest()[:8]}"


def line_task_id(name: str, line: int) -> str:
    return f"{name}.{line:05d}"


@dataclass(frozen=True)
class BatchLine:
    line: int
    task_id: str
    spec: RenderSpec


def parse_lines(lines: Iterable[str], *, name: str, webhook: str | None = None) -> list[BatchLine]:
    """Validate every line (blank lines and `#` comments are skipped, and keep their numbers); raise
    `BatchFileError` listing every problem, or return the specs with their task ids."""
    check_batch_name(name)
    errors: list[str] = []
    parsed: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if number > MAX_LINES:
            errors.append(f"line {number}: a batch holds at most {MAX_LINES} lines; split the file")
            break
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno}); one spec object per line")
            continue
        if not isinstance(data, dict):
            errors.append(f"line {number}: must be a JSON object (one render spec per line); got {type(data).__name__}")
            continue
        given = data.pop("task_id", None)
        task_id = line_task_id(name, number) if given is None else given
        try:
            check_task_id(task_id)
        except SpecError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        if webhook is not None and "webhook" not in data:
            data["webhook"] = webhook
        try:
            spec = RenderSpec.parse(data)
        except SpecError as exc:
            errors += [f"line {number}: {problem}" for problem in exc.problems]
            continue
        if task_id in seen:
            errors.append(f"line {number}: task_id: {task_id!r} is line {seen[task_id]}'s too; ids must be unique")
            continue
        seen[task_id] = number
        parsed.append(BatchLine(number, task_id, spec))
    if errors:
        raise BatchFileError(errors)
    if not parsed:
        raise BatchFileError(["line 1: the batch holds no spec; write one JSON spec per line"])
    return parsed


RESUBMITTED = {"failed": "failed", "revoked": "revoked", "expired": "expired", "unknown": "lost"}


class BatchClient(Protocol):
    """What a batch needs of its client (`RenderClient`): its Redis and settings, and many jobs' statuses and
    revocation. A protocol, so that this module imports no client and the client imports this one."""

    @property
    def redis(self) -> redis.Redis: ...

    @property
    def settings(self) -> ClientSettings: ...

    @property
    def tenant(self) -> str: ...

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]: ...

    def revoke_many(self, task_ids: Sequence[str]) -> dict[str, int]: ...


@dataclass
class BatchProgress:
    """Counts by state across the batch, and the images the succeeded jobs produced."""

    total: int
    states: Counter[str]
    images: int

    @property
    def finished(self) -> int:
        return sum(self.states[state] for state in TERMINAL)

    @property
    def running(self) -> int:
        return self.states["started"] + self.states["progress"]

    @property
    def done(self) -> bool:
        return self.finished + self.states["unknown"] >= self.total


class BatchHandle:
    """A batch's jobs in line order: progress, wait, revoke and results. Final statuses are read once."""

    def __init__(self, client: BatchClient, name: str, lines: Sequence[int], task_ids: Sequence[str]) -> None:
        self.client = client
        self.name = name
        self.lines = list(lines)
        self.task_ids = list(task_ids)
        self._final: dict[str, TaskStatus] = {}
        self.counts: Counter[str] = Counter()
        """What submitting did: new, skipped (already succeeded or interrupted), in_flight (queued or rendering,
        left alone), and the resubmitted: failed, revoked, expired, lost (a job Redis no longer knows)."""

    def summary(self) -> str:
        order = ("new", "skipped", "in_flight", "failed", "revoked", "expired", "lost")
        words = {
            "new": "new",
            "skipped": "already done (skipped)",
            "in_flight": "still queued or rendering (left alone)",
            "failed": "failed before (submitted again)",
            "revoked": "revoked before (submitted again)",
            "expired": "expired before (submitted again)",
            "lost": "lost (submitted again)",
        }
        parts = [f"{self.counts[key]} {words[key]}" for key in order if self.counts[key]]
        return f"batch {self.name}: {len(self.task_ids)} lines: " + (", ".join(parts) or "nothing submitted")

    def statuses(self) -> list[TaskStatus]:
        """Every job's status in line order; jobs seen final before are not read again."""
        open_ids = [task_id for task_id in self.task_ids if task_id not in self._final]
        current = dict(zip(open_ids, self.client.statuses(open_ids), strict=True))
        for task_id, status in current.items():
            if status.done:
                self._final[task_id] = status
        return [self._final.get(task_id) or current[task_id] for task_id in self.task_ids]

    def progress(self) -> BatchProgress:
        found = self.statuses()
        images = sum(len(s.manifest.images) for s in found if s.manifest is not None and s.state == "succeeded")
        return BatchProgress(len(found), Counter(s.state for s in found), images)

    def wait(
        self,
        timeout: float | None = None,
        *,
        interval: float = 1.0,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> BatchProgress:
        """Poll until every job is final (or unknown: lost, see `submit_batch` to resume); return the counts."""

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.progress()
            if on_progress is not None:
                on_progress(current)
            if current.done:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"batch {self.name}: {current.finished} of {current.total} done after {timeout} s")
            time.sleep(interval)

    def revoke(self) -> dict[str, int]:
        """Stop every unfinished job: queued ones are taken off their queue, running ones stop at their next step."""
        return self.client.revoke_many(self.task_ids)

    def results(self) -> list[tuple[int, TaskStatus]]:
        """(line, status) for every job, in line order."""
        return list(zip(self.lines, self.statuses(), strict=True))


def load_handle(client: BatchClient, name: str) -> BatchHandle:
    """The handle of a batch submitted before, from its record in Redis."""
    check_batch_name(name)
    with reaching(client.settings.redis_url):
        mapping = client.redis.hgetall(batch_tasks_key(name, client.tenant))
    if not mapping:
        raise SpecError(f"name: no batch {name!r} is known (it never ran, or its record expired)")
    pairs = sorted((int(line), text(task_id)) for line, task_id in mapping.items())
    return BatchHandle(client, name, [line for line, _ in pairs], [task_id for _, task_id in pairs])


def plan(
    parsed: list[BatchLine], previous: dict[int, str], statuses: list[TaskStatus], run: int
) -> tuple[list[BatchLine], list[BatchLine], Counter[str]]:
    """What to submit now and why (see the module's docstring): (to submit, every line with its id now, counts).

    `statuses` are those of each line's current id: the one `previous` maps it to, else the file's.
    """
    counts: Counter[str] = Counter()
    todo: list[BatchLine] = []
    current: list[BatchLine] = []
    for line, status in zip(parsed, statuses, strict=True):
        now = BatchLine(line.line, previous.get(line.line, line.task_id), line.spec)
        state = status.state
        if state in ("succeeded", "interrupted"):
            counts["skipped"] += 1
        elif state in ("queued", "started", "progress"):
            counts["in_flight"] += 1
        elif state == "unknown" and line.line not in previous:
            counts["new"] += 1
            todo.append(now)
        else:
            counts[RESUBMITTED[state]] += 1
            if state == "revoked":
                now = BatchLine(line.line, check_task_id(f"{line.task_id[:120]}{REVOKED_SUFFIX}{run}"), line.spec)
            todo.append(now)
        current.append(now)
    return todo, current, counts


def record(client: BatchClient, name: str, source: str, lines: list[BatchLine], run: int) -> None:
    """Write the batch's record and its line -> task id map (one pipelined round trip)."""
    now = time.time()
    ttl = client.settings.result_ttl
    info, tasks = batch_key(name, client.tenant), batch_tasks_key(name, client.tenant)
    writes = client.redis.pipeline(transaction=True)
    writes.hsetnx(info, "created_at", now)
    writes.hset(info, mapping={"name": name, "source": source, "total": len(lines), "runs": run, "updated_at": now})
    writes.delete(tasks)  # the batch is this file's lines now, should an edited file reuse a name
    writes.hset(tasks, mapping={str(line.line): line.task_id for line in lines})
    for key in (info, tasks):
        writes.expire(key, ttl)
    writes.execute()


def describe(client: BatchClient, name: str) -> dict[str, Any]:
    """The batch's record (source, total, runs, created_at, updated_at)."""
    raw = client.redis.hgetall(batch_key(name, client.tenant))
    out: dict[str, Any] = {text(key): text(value) for key, value in raw.items()}
    for key in ("total", "runs"):
        if key in out:
            out[key] = int(out[key])
    for key in ("created_at", "updated_at"):
        if key in out:
            out[key] = float(out[key])
    return out
