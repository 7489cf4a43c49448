"""A worker's Prometheus metrics, scraped over HTTP from its start (an idle worker is up) and after real jobs."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable

import pytest

from tests.helpers import free_port
from tests.integration.conftest import LONG, Farm, spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} is not exposed"
    return float(match.group(1))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_metrics_from_the_start_and_after_real_jobs(farm_factory: Callable[[], Farm]) -> None:
    farm = farm_factory()
    port = free_port()
    farm.start_workers("metered", metrics_port=str(port))
    # Ready (it answers a ping and advertises its models) and idle: Prometheus already finds it up.
    idle = scrape(port)
    assert "# TYPE render_jobs_total counter" in idle and "render_jobs_total{" not in idle, "no job has ended yet"
    assert farm.client.submit(spec(callbacks=[{"type": "frames", "every": 2}])).wait(timeout=60).status == "succeeded"
    assert (
        farm.client.submit(spec(callbacks=[{"type": "step_budget", "max_steps": 4}])).wait(60).status == "interrupted"
    )
    long = farm.client.submit(LONG)
    wait_for(farm, long.task_id, lambda s: (s.step or 0) >= 3)
    long.revoke()
    assert long.wait(timeout=60).status == "revoked"

    text = scrape(port)
    for status in ("succeeded", "interrupted", "revoked"):
        assert sample(text, "render_jobs_total", f'{{status="{status}",tenant="default"}}') == 1
    assert sample(text, "render_step_seconds_count", '{model="tiny-sd15"}') >= 10 + 4 + 3
    assert sample(text, "render_queue_wait_seconds_count", '{tenant="default"}') == 3
    assert sample(text, "render_pipeline_load_seconds_count") == 3
    assert sample(text, "render_revoke_to_stop_seconds_count") == 1
    assert sample(text, "render_frame_upload_seconds_count") == 5
    # The step hooks timed on the denoising thread: every model call of the three jobs, a small positive cost.
    calls = sample(text, "render_step_hook_calls_total", '{model="tiny-sd15"}')
    assert calls >= 10 + 4 + 3
    assert 0 < sample(text, "render_step_hook_seconds_total", '{model="tiny-sd15"}') / calls < 0.01
