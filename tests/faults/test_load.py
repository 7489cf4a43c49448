"""Load: a few hundred short jobs from several producer threads over two workers, some revoked on the way."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from producer.client import JobHandle, TaskStatus
from tests.faults.conftest import ChaosFarm

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(400)]

PRODUCERS = 4
JOBS_PER_PRODUCER = 60


def short(seed: int) -> dict[str, Any]:
    return {
        "model": "tiny-sd15",
        "prompt": f"job {seed}",
        "num_inference_steps": 2,
        "width": 64,
        "height": 64,
        "seed": seed,
        "num_images": 1 + seed % 2,
        **({"callbacks": [{"type": "step_budget", "max_steps": 1}]} if seed % 7 == 0 else {}),
    }


def check_final(farm: ChaosFarm, final: TaskStatus, *, was_revoked: bool) -> None:
    """One terminal state, agreed on by the result, the manifest and the stored objects."""
    task_id = final.task_id
    if not was_revoked:
        assert final.state != "revoked", f"{task_id} was never revoked but ended revoked"
    stored = farm.stored_manifest(task_id)
    if final.manifest is None:  # revoked while queued: Celery dropped the message before it ran
        assert final.state == "revoked" and stored is None and farm.objects(task_id) == [], task_id
        return
    manifest = final.manifest
    assert manifest.status == final.state, f"{task_id}: result says {final.state}, manifest {manifest.status}"
    assert stored is not None and stored["status"] == manifest.status
    images = [f"image-{i}.png" for i in range(manifest.spec["num_images"])]
    expected = ["manifest.json"] + (images if manifest.status != "revoked" else [])
    assert sorted(farm.objects(task_id)) == sorted(expected), task_id
    assert manifest.attempt == 1, f"{task_id} was recovered although no worker died"


def test_hundreds_of_jobs_from_four_producers_each_end_once_with_complete_results(
    chaos_farm: Callable[..., ChaosFarm],
) -> None:
    farm = chaos_farm()
    farm.start_workers("load-a", "load-b", torch_threads="1")
    handles: list[JobHandle] = []
    revoked: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(producer: int) -> None:
        rng = random.Random(producer)
        try:
            seeds = iter(range(producer * 1000, producer * 1000 + JOBS_PER_PRODUCER))
            made = 0
            while made < JOBS_PER_PRODUCER:  # single submits and batches of up to 8, mixed
                size = min(rng.choice([1, 1, 3, 8]), JOBS_PER_PRODUCER - made)
                specs = [short(next(seeds)) for _ in range(size)]
                batch = farm.client.submit_many(specs) if size > 1 else [farm.client.submit(specs[0])]
                made += size
                with lock:
                    handles.extend(batch)
                for handle in batch:  # revoke about one job in ten, wherever it is by then
                    if rng.random() < 0.1:
                        outcome = handle.revoke()
                        with lock:
                            revoked[handle.task_id] = outcome
                time.sleep(rng.random() * 0.05)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    total = PRODUCERS * JOBS_PER_PRODUCER
    assert len({h.task_id for h in handles}) == total

    finals = {h.task_id: list(farm.client.follow(h.task_id, interval=0.05, timeout=300))[-1] for h in handles}
    states = Counter(final.state for final in finals.values())
    assert sum(states.values()) == total and set(states) <= {"succeeded", "interrupted", "revoked"}, states
    assert states["revoked"] >= 1 and states["interrupted"] >= 1 and states["succeeded"] > total // 2, states
    for task_id, final in finals.items():
        check_final(farm, final, was_revoked=revoked.get(task_id) == "revoked")

    # Exactly one terminal outcome per job in the workers' own logs: no job ran twice.
    finished = Counter(re.findall(r"Task render\.run\[([0-9a-f]+)\] succeeded in", farm.log_text()))
    for task_id, final in finals.items():
        if final.state != "revoked":
            assert finished[task_id] == 1, f"{task_id} finished {finished[task_id]} times"
    assert farm.queue_is_empty()
    served = Counter(f.manifest.worker.split("@")[0] for f in finals.values() if f.manifest and f.manifest.worker)
    assert len(served) == 2, f"both workers took jobs: {served}"
