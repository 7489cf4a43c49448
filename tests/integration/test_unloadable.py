"""A model that passes the start-up checks but fails to load is withdrawn from its worker, never fails the queue.

Its files look whole (model_index.json and every component's folder: what `render worker` checks at start) but
its UNet weights are garbage, so `from_pretrained` fails when a job first needs it. The worker withdraws the
model (its advert, its queue) and hands the job on to a worker that can load it; a job whose model fails to load
on `RENDER_MAX_ATTEMPTS` attempts fails with the cause. The worker goes on serving its other models.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import wait_for_jobs, wait_until
from tests.integration.conftest import Farm, spec
from worker.models import tiny_sd15

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def models(**sources: str) -> str:
    return json.dumps({name: {"family": "sd15", "source": source} for name, source in sources.items()})


def advertised(farm: Farm, hostname: str) -> list[str]:
    return next((w.models for w in farm.client.workers() if w.hostname == hostname), [])


def test_a_model_that_fails_to_load_is_withdrawn_and_its_jobs_go_to_a_worker_that_loads_it(
    farm_factory: Callable[[], Farm], tmp_path: Path
) -> None:
    good = tmp_path / "good"
    tiny_sd15.build().save_pretrained(good)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model.*"):
        weights.write_bytes(b"not a tensor file" * 64)
    farm = farm_factory()

    (flaky,) = farm.start_workers(
        "flaky", models=models(**{"tiny-sd15": "tiny", "shared": str(broken), "doomed": str(broken)})
    )
    shared = farm.client.submit(spec(model="shared"))
    doomed = farm.client.submit(spec(model="doomed"))
    wait_until(
        lambda: advertised(farm, flaky.hostname) == ["tiny-sd15"], timeout=120, what="flaky to withdraw both models"
    )
    wait_until(
        lambda: (
            farm.client.status(doomed.task_id).state == "queued"
            and farm.client.status(shared.task_id).state == "queued"
        ),
        timeout=60,
        what="both jobs back in their queues",
    )
    (tiny,) = wait_for_jobs(farm.client, [farm.client.submit(spec()).task_id])
    assert tiny is not None and tiny.status == "succeeded", "the worker stopped serving the model it can load"
    assert "could not be loaded" in flaky.log_path.read_text()

    # A worker that loads `shared` takes its job; `doomed` fails to load there too: its second attempt, its last.
    farm.start_workers("sound", models=models(shared=str(good), doomed=str(broken)), max_attempts="2", ready=True)
    done, failed = wait_for_jobs(farm.client, [shared.task_id, doomed.task_id])
    assert done is not None and done.status == "succeeded" and done.attempt == 2
    assert done.worker is not None and done.worker.startswith("sound@")
    final = farm.client.status(doomed.task_id)
    assert final.state == "failed", final
    assert final.error is not None and "model 'doomed'" in final.error and "could not be loaded" in final.error
    assert "on 2 attempts; RENDER_MAX_ATTEMPTS is 2" in final.error
    assert failed is None or failed.status == "failed"
