"""The GPU thread of a worker process: the only thread that runs pipelines, one call (one job or a batch) at a time.

Each job's own thread (a Celery task) prepares it, hands it here with `GpuRunner.run`, and while it waits
reports the job's progress; once the call ends it encodes, uploads and writes the manifest while this thread
already runs the next job. Jobs with one `worker.engine.batching.shared_call_key` that are waiting when the GPU frees
run as one call of up to `max_batch` images. A call waits for no job that is not yet delivered: only, for at
most `GATHER_SECONDS`, for jobs this worker already holds that are still being checked, and while a burst of
jobs is still being delivered to it (a message within `BURST_GAP`). A lone job starts at once.

A job past its hard time limit is stopped at its next step (`TimeLimitExceeded`, a `failed` manifest). A
call stuck outside the steps (a decode or a load that never returns) cannot be stopped from Python: past
every job's limit plus `grace` seconds the watchdog ends the process, and the lease recovery puts its jobs
back on the queue, as Celery's prefork pool did when it killed a child over `task_time_limit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.engine.batching import denoise_batch, shared_call_key
from worker.engine.rendering import Denoised, Prepared
from worker.engine.stops import HandedOff, JobStopped, TimeLimitExceeded
from worker.hooks import StepInfo
from worker.models.registry import ModelRegistry

log = logging.getLogger(__name__)

_DONE = object()
_STARTED = object()

GATHER_SECONDS = 0.25
"""The longest a call waits for jobs already delivered to this worker that are still being checked (lease, inputs):
they reach the GPU queue milliseconds after the first of a burst. A call never waits for jobs not yet delivered."""

BURST_GAP = 0.01
"""A call being formed keeps gathering while the broker is still delivering a burst to this worker: a message
received after its first job was taken and less than this long ago. Celery takes a burst one message every
1-8 ms (measured on 2 busy cores), and the first job's checks can finish between two of them: without this the
first call of a burst of 24 often started with 1-3 of them and the stream took four calls instead of three."""


class Deliveries:
    """When this process last received a job's message from the broker (Celery's `task_received`, on the
    consumer's thread, before the job's own thread starts): the signal that a burst is still being delivered."""

    def __init__(self) -> None:
        self.last = float("-inf")
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def mark(self) -> None:
        self.last = time.monotonic()
        for listener in self._listeners:
            listener()


class Deadline:
    """A step hook: stop the job at its next step once `limit` seconds have passed since it was taken."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.at = clock() + limit

    def on_step(self, info: StepInfo) -> None:
        if self.clock() >= self.at:
            raise TimeLimitExceeded(info.steps_completed, self.limit)


class ProgressBox:
    """Progress posted by a job's step hook on the GPU thread, reported by the job's own thread: the step never
    waits on the Redis round trips of a report."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def post(self, step: int, total: int) -> None:
        self.events.put((step, total))


@dataclass
class Arrival:
    """A job on its way to the GPU queue (see `GpuRunner.arriving`)."""

    pending: bool = True
    at: float = field(default_factory=time.monotonic)  # when its job thread took it


@dataclass
class _Request:
    prepared: Prepared
    key: Hashable | None
    deadline: float
    box: ProgressBox | None
    skip: Callable[[], JobStopped | None] | None = None
    taken_at: float = field(default_factory=time.monotonic)
    outcome: Denoised | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def images(self) -> int:
        return self.prepared.spec.num_images


class GpuRunner:
    """Runs jobs' GPU phases on one thread, batching compatible waiting jobs up to `max_batch` images."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_batch: int = 1,
        on_call: Callable[[list[str]], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        grace: float = 60.0,
        exit_process: Callable[[int], None] = os._exit,
        deliveries: Deliveries | None = None,
    ) -> None:
        self.registry = registry
        self.max_batch = max_batch
        self.on_call = on_call
        self.on_idle = on_idle
        self.grace = grace
        self.exit_process = exit_process
        self.deliveries = deliveries or Deliveries()
        self._waiting: list[_Request] = []
        self._arrivals: list[Arrival] = []  # jobs taken by a job thread and not yet queued here
        self.gathering: str | None = None  # the first job of a call waiting for arriving jobs, while it waits
        self.draining = False  # set by `drain`: no job is taken any more
        self._cond = threading.Condition()
        self._running: list[_Request] = []
        self.calls: list[list[str]] = []  # task ids of each call, newest last (kept short)
        self._thread = threading.Thread(target=self._loop, name="render-gpu", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="render-gpu-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()
        self.deliveries.listen(self._wake)

    def drain(self) -> None:
        """The worker is shutting down: every job waiting for the GPU, and any queued from now on, is handed back
        (`HandedOff`) at once; the call in flight goes on (its jobs' `DrainHook`s decide)."""
        with self._cond:
            self.draining = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for request in waiting:
            self._settle(request, Denoised(stop=HandedOff(0)))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Held by a job thread from the moment it takes a job until it queues it (`run(..., arrival=...)`) or
        gives up on it, so that a call being formed can wait for it (at most `GATHER_SECONDS`)."""
        arrival = Arrival()
        with self._cond:
            self._arrivals.append(arrival)
        try:
            yield arrival
        finally:
            with self._cond:
                self._arrived(arrival)

    def _arrived(self, arrival: Arrival | None) -> None:
        """With the lock held: `arrival`'s job is queued or given up."""
        if arrival is not None and arrival.pending:
            arrival.pending = False
            self._arrivals.remove(arrival)
        self._cond.notify_all()

    def run(
        self,
        prepared: Prepared,
        *,
        deadline: float | None = None,
        box: ProgressBox | None = None,
        report: Callable[[int, int], None] | None = None,
        started: Callable[[], None] | None = None,
        skip: Callable[[], JobStopped | None] | None = None,
        arrival: Arrival | None = None,
    ) -> Denoised:
        """Queue the job's GPU phase and wait for it; meanwhile, on this thread, call `started()` when the GPU takes
        the job and `report(step, total)` for each progress its hook posts to `box`.

        `deadline` (time.monotonic()) is when the job's hard limit is over, for the watchdog. `skip()` runs when
        the GPU takes the job: a stop it returns (a revoke that came while the job waited) ends the job there.
        """
        key = shared_call_key(prepared.spec) if self.max_batch > 1 and not prepared.resuming else None
        request = _Request(prepared, key, deadline if deadline is not None else float("inf"), box, skip)
        if arrival is not None:
            request.taken_at = arrival.at
        with self._cond:
            if self.draining:
                self._arrived(arrival)
                return Denoised(stop=HandedOff(0))
            self._waiting.append(request)
            self._arrived(arrival)
        if box is None:
            request.done.wait()
        else:
            while (item := box.events.get()) is not _DONE:
                try:
                    if item is _STARTED:
                        if started is not None:
                            started()
                    elif report is not None:
                        report(*item)
                except Exception as exc:  # progress is informative; it never stops a render
                    log.warning("progress report failed: %s", exc)
        assert request.outcome is not None
        return request.outcome

    def _take(self) -> list[_Request]:
        """The job delivered first and the compatible ones waiting behind it, up to `max_batch` images."""
        with self._cond:
            first = self._first()
            self._waiting.remove(first)
            batch = [first]
            if first.key is not None:
                gather_until = time.monotonic() + GATHER_SECONDS
                while (wait := self._gather_wait(first, gather_until)) > 0:
                    self.gathering = first.prepared.job.task_id
                    self._cond.wait(wait)
                self.gathering = None
                images = first.images
                for request in list(self._waiting):
                    if request.key == first.key and images + request.images <= self.max_batch:
                        batch.append(request)
                        self._waiting.remove(request)
                        images += request.images
            self._running = batch
            return batch

    def _first(self) -> _Request:
        """With the lock held: the waiting job this worker was delivered first. Jobs arrive here in delivery order
        only as long as their checks take alike: one delivered earlier whose checks are slower (its inputs, a busy
        machine) is waited for, at most `GATHER_SECONDS`, so a high-priority job the broker handed over before a
        normal one also starts before it."""
        until: float | None = None
        while True:
            while not self._waiting:
                self._cond.wait()
            first = min(self._waiting, key=lambda request: request.taken_at)
            if not any(arrival.at < first.taken_at for arrival in self._arrivals):
                return first
            until = until if until is not None else time.monotonic() + GATHER_SECONDS
            if (left := until - time.monotonic()) <= 0:
                return first
            self.gathering = first.prepared.job.task_id
            self._cond.wait(left)
            self.gathering = None

    def _gather_wait(self, first: _Request, until: float) -> float:
        """With the lock held: how long the call of `first` may wait for more jobs now (0: it starts)."""
        now = time.monotonic()
        compatible = first.images + sum(r.images for r in self._waiting if r.key == first.key)
        if now >= until or compatible >= self.max_batch:
            return 0.0
        if self._arrivals:  # a job this worker holds is still being checked
            return until - now
        last = self.deliveries.last
        if last > first.taken_at and now - last < BURST_GAP:  # a burst is still being delivered
            return min(until, last + BURST_GAP) - now
        return 0.0

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: B036 - whatever ended it, no job can run here any more
            log.critical(
                "the GPU thread died (%s: %s): exiting, so the process restarts and the lease recovery hands its jobs "
                "to another worker",
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            with self._cond:
                self.draining = True  # nothing is taken any more
                doomed, self._waiting, self._running = self._waiting + self._running, [], []
            for request in doomed:
                self._settle(request, Denoised(error=RuntimeError(f"the worker's GPU thread died: {exc!r}")))
            self.exit_process(70)

    def _serve(self) -> None:
        while True:
            taken = self._take()
            if self.draining:  # `drain` came while the call was being formed
                with self._cond:
                    self._running = []
                for request in taken:
                    self._settle(request, Denoised(stop=HandedOff(0)))
                continue
            batch = [request for request in taken if not self._skipped(request)]
            if not batch:  # every job was revoked while it waited: nothing runs, and nothing is left for the watchdog
                with self._cond:
                    self._running = []
                continue
            for request in batch:
                if request.box is not None:
                    request.box.events.put(_STARTED)
            ids = [request.prepared.job.task_id for request in batch]
            self.calls = [*self.calls[-99:], ids]
            if self.on_call is not None:
                self.on_call(ids)
            try:
                outcomes = denoise_batch([request.prepared for request in batch], self.registry)
            except Exception as exc:  # denoise_batch returns errors as outcomes; this is a bug, not a job's failure
                log.exception("the GPU call of %s failed outside any job", ids)
                outcomes = [Denoised(error=exc, batched_with=[i for i in ids if i != own]) for own in ids]
            with self._cond:
                self._running = []
            for request, outcome in zip(batch, outcomes, strict=True):
                self._settle(request, outcome)
            if self.on_idle is not None and not self._waiting:
                self.on_idle()

    def _skipped(self, request: _Request) -> bool:
        try:
            stop = request.skip() if request.skip is not None else None
        except Exception as exc:  # the check fails open, like the step hook's
            log.warning("pre-start check of %s failed (running it): %s", request.prepared.job.task_id, exc)
            stop = None
        if stop is not None:
            self._settle(request, Denoised(stop=stop))
        return stop is not None

    @staticmethod
    def _settle(request: _Request, outcome: Denoised) -> None:
        request.outcome = outcome
        request.done.set()
        if request.box is not None:
            request.box.events.put(_DONE)

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self._cond:
                running = list(self._running)
            if not running:
                continue
            limit = max(request.deadline for request in running) + self.grace
            if time.monotonic() > limit:
                ids = [request.prepared.job.task_id for request in running]
                log.critical(
                    "the GPU call of %s is %.0f s past its jobs' time limit and no step ended it: exiting, so the "
                    "process restarts and the lease recovery hands its jobs to another worker",
                    ids,
                    self.grace,
                )
                self.exit_process(70)
                return
