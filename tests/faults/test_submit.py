"""A submitter SIGKILLed mid-submission loses nothing: a rerun of `render batch` completes every line exactly once.

The submitter reaches Redis through a proxy of its own. The proxy holds the exact request at which it is killed
(the staging transaction, the first task message, the "sent" mark), so the kill lands at that point of the
submission however slow the machine is. "Exactly once" is read from the bucket, which keeps every version of
every object: each line's manifest and image were written once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from localfarm.cluster import wait_until
from producer.keys import UNSENT_JOBS
from tests.faults.conftest import ChaosFarm
from tests.faults.proxy import FaultProxy
from tests.helpers import ROOT, render_cli, wait_for_jobs

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

LINES = 3

# Where the submitter dies, as the first request the proxy holds: before the staging transaction reaches Redis
# (only the batch's own record is written), after it and before any task message is sent (every job record
# stands without a message: the case that used to be lost for good), and after every message is sent but before
# they are marked sent (the recovery scan sends them again: a second copy must render nothing).
KILL_POINTS = {
    "before-the-records": b"ZADD\r\n$13\r\n" + UNSENT_JOBS.encode(),
    "after-the-records": b"LPUSH",
    "after-the-messages": b"ZREM\r\n$13\r\n" + UNSENT_JOBS.encode(),
}


def versions(farm: ChaosFarm, key: str) -> int:
    listing = boto3.client("s3", endpoint_url=farm.s3_endpoint).list_object_versions(Bucket=farm.bucket, Prefix=key)
    return len([v for v in listing.get("Versions", []) if v["Key"] == key])


def test_a_batch_whose_submitter_is_killed_at_any_point_completes_every_line_once(
    chaos_farm: Callable[..., ChaosFarm], tmp_path: Path
) -> None:
    farm = chaos_farm()
    boto3.client("s3", endpoint_url=farm.s3_endpoint).put_bucket_versioning(
        Bucket=farm.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    farm.start_workers("survivor", lease_ttl="3", recovery_interval="0.5")
    assert farm.server is not None
    for point, marker in KILL_POINTS.items():
        path = tmp_path / f"{point}.jsonl"
        specs = [
            {"model": "tiny-sd15", "prompt": f"{point} {n}", "num_inference_steps": 4, "width": 64, "height": 64}
            for n in range(LINES)
        ]
        path.write_text("".join(json.dumps(spec) + "\n" for spec in specs))
        with FaultProxy(farm.server.port) as own:
            held = own.hold_at(marker)
            submitter = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "batch", str(path), "--name", point, "--detach", "--queue-anyway"],
                cwd=ROOT,
                env={**os.environ, "RENDER_REDIS_URL": f"redis://{own.address}/0"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(held.is_set, timeout=120, what=f"the submitter to reach {point}", process=submitter)
            finally:
                submitter.send_signal(signal.SIGKILL)
                submitter.wait(timeout=30)

        rerun = render_cli(
            "batch", str(path), "--name", point, "--detach", "--queue-anyway", env={"RENDER_REDIS_URL": farm.redis_url}
        )
        assert rerun.returncode == 0, rerun.stderr
        task_ids = farm.client.batch(point).task_ids
        assert len(task_ids) == LINES
        manifests = wait_for_jobs(farm.client, task_ids)
        assert [m.status if m else None for m in manifests] == ["succeeded"] * LINES, point
        for task_id in task_ids:
            for name in ("manifest.json", "image-0.png"):
                assert versions(farm, f"renders/{task_id}/{name}") == 1, f"{point}: {task_id}/{name} written twice"
        wait_until(lambda: farm.direct.zcard(UNSENT_JOBS) == 0, timeout=60, what="the unsent messages to be sent")
