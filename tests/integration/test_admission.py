"""Admission at submit and the job listing, against a real redis-server (no worker needed: jobs stay queued).

Idempotent submit (same key and body: the same job, nothing enqueued; another body: a conflict), the bounded
queue (`RENDER_MAX_QUEUED`: `QueueFull`, nothing enqueued), and `RenderClient.jobs` (order, cursor paging, the
batch and status filters).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from producer.client import RenderClient
from producer.errors import IdempotencyConflict, QueueFull, SpecError
from producer.keys import JOB_INDEX, model_queue, priority_lists
from tests.integration.conftest import Farm, spec


@pytest.fixture
def farm(farm_factory: Callable[[], Farm]) -> Farm:
    """A farm of its own with no worker: everything submitted stays queued."""
    return farm_factory()


def queued(farm: Farm, model: str = "tiny-sd15") -> int:
    return sum(int(farm.redis.llen(name)) for name in priority_lists(model_queue("render", model)).values())


def test_the_same_key_and_body_is_the_same_job_and_enqueues_nothing(farm: Farm) -> None:
    first = farm.client.submit(spec(), wait_for_worker=True, idempotency_key="order-1")
    # The same spec spelled otherwise (a default written out, keys reordered) is the same body.
    again = farm.client.submit(
        {"seed": 1, **spec(), "guidance_scale": 7.5}, wait_for_worker=True, idempotency_key="order-1"
    )
    assert again.task_id == first.task_id
    assert queued(farm) == 1
    assert farm.redis.zcard(JOB_INDEX) == 1

    with pytest.raises(IdempotencyConflict, match="Idempotency-Key") as conflict:
        farm.client.submit(spec(prompt="another"), wait_for_worker=True, idempotency_key="order-1")
    assert conflict.value.task_id == first.task_id
    assert isinstance(conflict.value, SpecError)
    with pytest.raises(IdempotencyConflict):  # the priority is part of the body
        farm.client.submit(spec(), wait_for_worker=True, priority="high", idempotency_key="order-1")
    assert queued(farm) == 1

    other = farm.client.submit(spec(), wait_for_worker=True, idempotency_key="order-2")
    assert other.task_id != first.task_id
    assert queued(farm) == 2


def test_a_failed_submit_gives_its_key_up(farm: Farm) -> None:
    bounded = RenderClient(farm.client.settings.model_copy(update={"max_queued": 1}))
    try:
        bounded.submit(spec(), wait_for_worker=True)
        with pytest.raises(QueueFull):
            bounded.submit(spec(seed=2), wait_for_worker=True, idempotency_key="retry-me")
        farm.redis.delete(*priority_lists(model_queue("render", "tiny-sd15")).values())
        handle = bounded.submit(spec(seed=2), wait_for_worker=True, idempotency_key="retry-me")
        assert queued(farm) == 1
        assert bounded.status(handle.task_id).state == "queued"
    finally:
        bounded.close()


def test_a_full_queue_refuses_and_enqueues_nothing(farm: Farm) -> None:
    bounded = RenderClient(farm.client.settings.model_copy(update={"max_queued": 3}))
    try:
        bounded.submit_many([spec(seed=i) for i in range(2)], wait_for_worker=True)
        bounded.submit(spec(seed=3), wait_for_worker=True, priority="high")  # every priority counts
        with pytest.raises(QueueFull) as full:
            bounded.submit(spec(seed=4), wait_for_worker=True, priority="low")
        assert str(full.value) == "queue for model 'tiny-sd15' is full (3 queued, RENDER_MAX_QUEUED=3); retry in 5 s"
        assert full.value.retry_after == 5.0
        with pytest.raises(QueueFull):
            bounded.submit_batch([spec(seed=5)], name="too-many", wait_for_worker=True)
        assert queued(farm) == 3
        assert farm.redis.zcard(JOB_INDEX) == 3
        # Another model's queue has room of its own.
        bounded.submit(spec(model="tiny-sdxl"), wait_for_worker=True)
        assert queued(farm, "tiny-sdxl") == 1
    finally:
        bounded.close()


def test_jobs_newest_first_in_pages_filtered_by_batch_and_status(farm: Farm) -> None:
    client = farm.client
    singles = [client.submit(spec(seed=i), wait_for_worker=True).task_id for i in range(4)]
    together = [h.task_id for h in client.submit_many([spec(seed=10 + i) for i in range(3)], wait_for_worker=True)]
    night = client.submit_batch([spec(seed=20 + i) for i in range(3)], name="night", wait_for_worker=True)
    # Newest first; jobs submitted together share a time and come in descending id order.
    expected = sorted(night.task_ids, reverse=True) + sorted(together, reverse=True) + singles[::-1]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = client.jobs(limit=4, cursor=cursor)
        pages += 1
        assert len(page) <= 4
        seen += [status.task_id for status in page]
        assert all(status.state == "queued" and status.submitted_at for status in page)
        if cursor is None:
            break
    assert seen == expected
    assert pages == 3

    in_batch, cursor = client.jobs(batch="night")
    assert [s.task_id for s in in_batch] == sorted(night.task_ids, reverse=True) and cursor is None
    first, cursor = client.jobs(batch="night", limit=2)
    rest, end = client.jobs(batch="night", limit=2, cursor=cursor)
    assert [s.task_id for s in first + rest] == sorted(night.task_ids, reverse=True) and end is None

    client.revoke_many([singles[1], together[0]])
    revoked, _ = client.jobs(status="revoked")
    assert {s.task_id for s in revoked} == {singles[1], together[0]}
    still, _ = client.jobs(status="queued", limit=100)
    assert len(still) == len(expected) - 2
    assert client.jobs(batch="night", status="revoked") == ([], None)

    with pytest.raises(SpecError, match="status: must be one of"):
        client.jobs(status="done")
    with pytest.raises(SpecError, match="cursor:"):
        client.jobs(cursor="nonsense")
    with pytest.raises(SpecError, match="limit:"):
        client.jobs(limit=0)
