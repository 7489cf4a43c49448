"""The worker's deadline check (`worker.process.runner.expiry`): which attempts of a job can expire, and when."""

from __future__ import annotations

from producer.records import TaskMessage
from producer.spec import RenderSpec
from worker.engine.stops import JobExpired
from worker.process.runner import expiry

SPEC = RenderSpec.parse({"model": "tiny-sd15", "prompt": "a lighthouse", "deadline_seconds": 10})


def message(attempt: int, load_failures: int = 0) -> TaskMessage:
    return TaskMessage("job-1", SPEC.model_dump_json(), "render.tiny-sd15", 3, 1000.0, attempt, load_failures)


def test_a_first_attempt_expires_once_its_deadline_passed() -> None:
    now = [1009.9]
    check = expiry(SPEC, message(attempt=1), clock=lambda: now[0])
    assert check() is None
    now[0] = 1010.0
    stop = check()
    assert isinstance(stop, JobExpired)
    assert stop.error == "deadline of 10 s passed before a worker started it"


def test_only_jobs_no_worker_started_expire() -> None:
    late = lambda: 5000.0  # noqa: E731
    assert expiry(SPEC, message(attempt=2), clock=late)() is None  # handed back or recovered after it started
    assert isinstance(expiry(SPEC, message(attempt=2, load_failures=1), clock=late)(), JobExpired)
    assert expiry(SPEC.model_copy(update={"deadline_seconds": None}), message(attempt=1), clock=late)() is None
