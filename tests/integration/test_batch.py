"""`render batch` on a real farm: submit, interrupt and resume, bad lines, revoke, webhooks, the gallery."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest

from producer.batch import batch_tasks_key, default_name
from producer.keys import RUNNING_TASKS, job_key, model_queue, priority_lists
from producer.webhooks import SIGNATURE_HEADER, verify
from tests.browser import dump_dom, ensure_chromium
from tests.helpers import render_cli, wait_until
from tests.integration.conftest import WEBHOOK_SECRET, Farm, Receiver, spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).parents[2]


def env(farm: Farm) -> dict[str, str]:
    return {
        "RENDER_REDIS_URL": farm.redis_url,
        "RENDER_STORAGE_URL": f"s3://{farm.bucket}/renders",
        "RENDER_S3_ENDPOINT_URL": farm.s3_endpoint,
        "RENDER_WEBHOOK_HOSTS": "127.0.0.1",
    }


def write_batch(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def successes(farm: Farm) -> Counter[str]:
    """Renders that succeeded, per task id, as the workers logged them."""
    found: Counter[str] = Counter()
    for worker in farm.workers:
        found.update(re.findall(r"Task render\.run\[([^\]]+)\] succeeded", worker.log_path.read_text(errors="replace")))
    return found


def succeeded(farm: Farm, name: str) -> int:
    if not farm.redis.exists(batch_tasks_key(name)):
        return 0  # the client has not recorded the batch yet
    return sum(s.state == "succeeded" for s in farm.client.batch(name).statuses())


def test_a_40_line_batch_interrupted_and_run_again_renders_each_line_once(farm: Farm, tmp_path: Path) -> None:
    path = write_batch(
        tmp_path / "forty.jsonl", [spec(seed=i, prompt=f"line {i}", num_inference_steps=8) for i in range(40)]
    )
    name = default_name(str(path), path.read_bytes())
    before = successes(farm)
    first = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "batch", str(path)],
        cwd=ROOT,
        env={**os.environ, **env(farm)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: succeeded(farm, name) >= 5, timeout=120, what="the first jobs of the batch", process=first)
    finally:
        first.send_signal(signal.SIGKILL)  # the client dies halfway; its jobs are already queued
        first.communicate()
    halfway = farm.client.batch(name).progress()
    assert halfway.finished < 40, "the batch finished before the client was killed; make its jobs longer"

    again = render_cli("batch", str(path), env=env(farm), timeout=240)
    assert again.returncode == 0, again.stderr
    counts = [int(n) for n in re.findall(r"(\d+) (?:already done|still queued|new|lost|failed|revoked)", again.stdout)]
    assert sum(counts) == 40 and "already done (skipped)" in again.stdout and " new" not in again.stdout, again.stdout

    handle = farm.client.batch(name)
    assert [s.state for s in handle.statuses()] == ["succeeded"] * 40
    assert handle.task_ids == [f"{name}.{line:05d}" for line in range(1, 41)]
    rendered = successes(farm) - before
    assert {task_id: rendered[task_id] for task_id in handle.task_ids} == dict.fromkeys(handle.task_ids, 1)

    index = boto3.client("s3", endpoint_url=farm.s3_endpoint).get_object(
        Bucket=farm.bucket, Key=f"renders/_batches/{name}/index.jsonl"
    )
    rows = [json.loads(line) for line in index["Body"].read().decode().splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 41))
    assert sum(len(row["images"]) for row in rows) == 40 and {row["status"] for row in rows} == {"succeeded"}
    gallery = re.search(r"^gallery: (http\S+)$", again.stdout, re.MULTILINE)
    assert gallery is not None, again.stdout  # a presigned link to index.html
    ensure_chromium()
    summary = re.search(r'id="summary"[^>]*', dump_dom(gallery.group(1)))
    assert summary is not None and 'data-loaded="40"' in summary.group(0) and 'data-broken="0"' in summary.group(0)


def test_three_bad_lines_among_twenty_are_all_reported_and_nothing_is_sent(farm: Farm, tmp_path: Path) -> None:
    good = [spec(seed=i) for i in range(20)]
    lines: list[dict[str, Any] | str] = [
        *good[:3],
        {**spec(), "width": 65},
        *good[3:10],
        "{not json",
        *good[10:],
        {"prompt": "no model"},
    ]
    path = write_batch(tmp_path / "bad.jsonl", lines)
    done = render_cli("batch", str(path), "--name", "bad-lines", env=env(farm))
    assert done.returncode == 2, done.stderr
    assert "3 invalid line(s); nothing was submitted" in done.stderr
    assert "line 4: width: must be a multiple of 8" in done.stderr
    assert "line 12: not valid JSON" in done.stderr
    assert "line 23: model: Field required" in done.stderr
    assert not farm.redis.keys("render:batch:bad-lines*")
    assert not [k for k in farm.redis.scan_iter(match=job_key("bad-lines*"))]


def test_revoking_a_running_batch_leaves_nothing_queued_or_running_and_finished_jobs_untouched(
    farm: Farm, tmp_path: Path
) -> None:
    # Several seconds each (150 steps at 512²), so a worker finishes at most the job it holds while the revoke CLI
    # starts (at 320² a job took 2.1 s beside a CPU-bound process, and two ended in that window).
    specs = [spec(seed=i, num_inference_steps=150, width=512, height=512) for i in range(10)]
    path = write_batch(tmp_path / "long.jsonl", [specs[0] | {"num_inference_steps": 2}, *specs[1:]])
    detached = render_cli("batch", str(path), "--name", "to-revoke", "--detach", env=env(farm))
    assert detached.returncode == 0 and "10 new" in detached.stdout, detached.stderr
    handle = farm.client.batch("to-revoke")
    wait_until(
        lambda: handle.progress().states["succeeded"] >= 1 and handle.progress().running >= 1,
        timeout=120,
        what="one job done and one rendering",
    )
    finished_before = {s.task_id: s.manifest for s in handle.statuses() if s.done}

    revoked = render_cli("batch", "revoke", "to-revoke", env=env(farm))
    assert revoked.returncode == 0, revoked.stderr
    assert "taken off the queue" in revoked.stdout and "nothing runs any more" in revoked.stdout

    after = handle.statuses()
    assert all(s.done for s in after), [(s.task_id, s.state) for s in after]
    assert {s.task_id: s.manifest for s in after if s.task_id in finished_before} == finished_before
    assert sum(s.state == "revoked" for s in after) >= 10 - len(finished_before) - len(farm.workers)
    queues = [name for name in priority_lists(model_queue("render", "tiny-sd15")).values()]
    queued = [raw for name in queues for raw in farm.redis.lrange(name, 0, -1)]
    assert not [raw for raw in queued if b"to-revoke." in raw]
    running: list[bytes] = farm.redis.hkeys(RUNNING_TASKS)  # type: ignore[assignment]
    assert not [k for k in running if k.startswith(b"to-revoke.")]
    assert farm.redis.hlen(batch_tasks_key("to-revoke")) == 10


def test_every_job_of_a_batch_posts_one_signed_webhook(farm: Farm, tmp_path: Path, receiver: Receiver) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    path = write_batch(tmp_path / "hooks.jsonl", [spec(seed=i, num_inference_steps=2) for i in range(3)])
    done = render_cli("batch", str(path), "--name", "hooks", "--webhook", url, env=env(farm), timeout=180)
    assert done.returncode == 0, done.stderr
    handle = farm.client.batch("hooks")
    wait_until(lambda: len(receiver.posts) >= 3, timeout=60, what="three webhooks")
    by_task = Counter(headers["X-Render-Task-Id"] for headers, _ in receiver.posts)
    assert by_task == dict.fromkeys(handle.task_ids, 1)
    for headers, body in receiver.posts:
        assert verify(WEBHOOK_SECRET, body, headers[SIGNATURE_HEADER])
        assert json.loads(body)["status"] == "succeeded"
    state = json.loads(render_cli("status", handle.task_ids[0], "--json", env=env(farm)).stdout)["webhook"]
    assert state["state"] == "delivered" and state["attempts"] == 1 and state["url"] == url


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/hook"])
def test_a_webhook_to_an_internal_address_is_refused_at_submit(farm: Farm, tmp_path: Path, url: str) -> None:
    path = write_batch(tmp_path / "ssrf.jsonl", [spec()])
    refused = render_cli(
        "batch", str(path), "--name", "ssrf", "--webhook", url, env={**env(farm), "RENDER_WEBHOOK_HOSTS": ""}
    )
    assert refused.returncode == 2 and "error: webhook: " in refused.stderr, refused.stderr
    assert not farm.redis.exists("render:batch:ssrf")
