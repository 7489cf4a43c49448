"""Batch files: validation of every line, names and ids, the resume plan, and submission against a real Redis."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from localfarm.cluster import RedisServer
from producer.batch import BatchLine, BatchProgress, check_batch_name, default_name, parse_lines, plan
from producer.client import RenderClient, TaskStatus
from producer.errors import BatchFileError, SpecError
from producer.keys import model_queue, priority_lists, revoked_key
from producer.spec import RenderSpec
from worker.views.batch_view import BatchDisplay

GOOD = {"model": "tiny-sd15", "prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64}


def lines(*specs: object) -> list[str]:
    return [spec if isinstance(spec, str) else json.dumps(spec) for spec in specs]


def test_every_bad_line_is_reported_with_its_number_and_field() -> None:
    text = lines(
        GOOD, {**GOOD, "width": 65, "steps": 3}, "", "# a comment", "[1, 2]", "{broken", GOOD | {"task_id": "../x"}
    )
    with pytest.raises(BatchFileError) as caught:
        parse_lines(text, name="b")
    assert caught.value.errors == [
        "line 2: width: must be a multiple of 8 (the VAE downsamples by 8); got 65, try 64",
        "line 2: steps: unknown field; remove it (see `render schema` for the fields a spec may have)",
        "line 5: must be a JSON object (one render spec per line); got list",
        "line 6: not valid JSON (Expecting property name enclosed in double quotes at column 2); "
        "one spec object per line",
        "line 7: task_id: '../x' is not a valid task id; use 1-128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit (or leave it out for a generated one)",
    ]
    assert str(caught.value).startswith("5 invalid line(s); nothing was submitted:\nline 2: width")


def test_ids_derive_from_the_name_and_line_unless_given_and_must_be_unique() -> None:
    parsed = parse_lines(lines(GOOD, "", GOOD | {"task_id": "mine"}, GOOD), name="night")
    assert [(p.line, p.task_id) for p in parsed] == [(1, "night.00001"), (3, "mine"), (4, "night.00004")]
    with pytest.raises(BatchFileError, match="line 2: task_id: 'same' is line 1's too"):
        parse_lines(lines(GOOD | {"task_id": "same"}, GOOD | {"task_id": "same"}), name="night")
    with pytest.raises(BatchFileError, match="holds no spec"):
        parse_lines(["", "# nothing"], name="night")


def test_a_batch_webhook_applies_to_lines_without_their_own() -> None:
    own = "https://hooks.example.com/own"
    parsed = parse_lines(lines(GOOD, GOOD | {"webhook": own}), name="w", webhook="https://hooks.example.com/all")
    assert [p.spec.webhook for p in parsed] == ["https://hooks.example.com/all", own]
    with pytest.raises(BatchFileError, match="line 1: webhook: Value error|line 1: webhook: must be an http"):
        parse_lines(lines(GOOD | {"webhook": "ftp://x/"}), name="w")


def test_default_names_follow_the_file_and_its_content() -> None:
    one = default_name("/data/My Prompts.jsonl", b"a")
    assert one.startswith("My-Prompts-") and len(one) == len("My-Prompts-") + 8
    assert default_name("/other/My Prompts.jsonl", b"a") == one  # the same file elsewhere is the same batch
    assert default_name("/data/My Prompts.jsonl", b"b") != one
    assert default_name("-", b"a").startswith("stdin-")
    assert check_batch_name(one) == one
    with pytest.raises(SpecError, match="name: '../x' is not a valid batch name"):
        check_batch_name("../x")


def test_the_resume_plan_skips_done_leaves_running_and_resubmits_the_rest() -> None:
    spec = RenderSpec.parse(GOOD)
    parsed = [BatchLine(n, f"b.{n:05d}", spec) for n in range(1, 8)]
    states = ["succeeded", "interrupted", "queued", "progress", "failed", "revoked", "unknown"]
    statuses = [TaskStatus(f"b.{n:05d}", state) for n, state in enumerate(states, start=1)]  # type: ignore[arg-type]
    previous = {n: f"b.{n:05d}" for n in range(1, 8)}
    todo, current, counts = plan(parsed, previous, statuses, run=2)
    assert [(t.line, t.task_id) for t in todo] == [(5, "b.00005"), (6, "b.00006.r2"), (7, "b.00007")]
    assert counts == {"skipped": 2, "in_flight": 2, "failed": 1, "revoked": 1, "lost": 1}
    assert [c.task_id for c in current][5] == "b.00006.r2"
    todo, _, counts = plan(parsed[6:], {}, statuses[6:], run=1)  # never submitted: new, not lost
    assert counts == {"new": 1} and todo[0].task_id == "b.00007"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RenderClient]:
    with RedisServer(workdir=tmp_path_factory.mktemp("batch-redis")) as server:
        made = RenderClient(redis_url=server.url)
        yield made
        made.close()


def queued_ids(client: RenderClient) -> list[str]:
    names = priority_lists(model_queue("render", "tiny-sd15")).values()
    return sorted(json.loads(raw)["headers"]["id"] for name in names for raw in client.redis.lrange(name, 0, -1))


def test_submitting_twice_sends_each_line_once_and_revoke_takes_queued_jobs_off_the_queue(
    client: RenderClient, tmp_path: Path
) -> None:
    client.redis.flushdb()
    specs = [GOOD | {"seed": i} for i in range(1200)]  # more than two chunks of 500
    sent: list[tuple[int, int]] = []
    first = client.submit_batch(specs, name="twice", wait_for_worker=True, on_chunk=lambda n, t: sent.append((n, t)))
    assert sent == [(500, 1200), (1000, 1200), (1200, 1200)]
    assert first.counts == {"new": 1200} and len(queued_ids(client)) == 1200
    again = client.submit_batch(specs, name="twice", wait_for_worker=True)
    assert again.counts == {"in_flight": 1200} and len(queued_ids(client)) == 1200
    assert "1200 still queued or rendering (left alone)" in again.summary()

    outcome = client.batch("twice").revoke()
    assert outcome == {"dequeued": 1200, "stopping": 0, "finished": 0, "unknown": 0}
    assert queued_ids(client) == []
    assert {s.state for s in first.statuses()} == {"revoked"}
    assert client.redis.exists(revoked_key("twice.00001"))

    third = client.submit_batch(specs[:3], name="twice", wait_for_worker=True)  # revoked lines go again, new ids
    assert third.counts == {"revoked": 3} and third.task_ids == ["twice.00001.r3", "twice.00002.r3", "twice.00003.r3"]
    assert queued_ids(client) == third.task_ids
    assert [s.state for s in client.batch("twice").statuses()] == ["queued"] * 3


def test_nothing_is_sent_when_one_line_is_bad(client: RenderClient) -> None:
    client.redis.flushdb()
    with pytest.raises(BatchFileError):
        client.submit_batch([GOOD, GOOD | {"width": 1}], name="bad", wait_for_worker=True)
    assert client.redis.dbsize() == 0


def test_an_unknown_batch_is_a_clear_error(client: RenderClient) -> None:
    with pytest.raises(SpecError, match="no batch 'nope' is known"):
        client.batch("nope")


def test_a_webhook_to_an_internal_address_is_refused_before_anything_is_sent(client: RenderClient) -> None:
    client.redis.flushdb()
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:8080/hook", "http://localhost/"):
        with pytest.raises(SpecError, match="^webhook: "):
            client.submit(GOOD | {"webhook": url}, wait_for_worker=True)
        with pytest.raises(SpecError, match="^webhook: "):
            client.submit_batch([GOOD], name="ssrf", webhook=url, wait_for_worker=True)
    assert client.redis.dbsize() == 0
    allowed = RenderClient(client.settings.model_copy(update={"webhook_hosts": ("127.0.0.1",)}))
    handle = allowed.submit(GOOD | {"webhook": "http://127.0.0.1:8080/hook"}, wait_for_worker=True)
    assert handle.status().state == "queued"
    allowed.close()


def test_statuses_reads_many_jobs_in_a_few_round_trips(client: RenderClient) -> None:
    client.redis.flushdb()
    handles = client.submit_many([GOOD] * 5, wait_for_worker=True)
    ids = [h.task_id for h in handles] + ["never-seen"]
    before = client.redis.info("commandstats")
    found = client.statuses(ids)
    after = client.redis.info("commandstats")
    assert [s.state for s in found] == ["queued"] * 5 + ["unknown"]
    # No worker is live here: every queued job says what it waits for.
    assert {s.waiting for s in found[:5]} == {f"no live worker serves {GOOD['model']}"} and found[5].waiting is None
    calls = {name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"] for name in after}
    # One MGET, one pipeline of the job records, one look at the live workers (none: no second round trip).
    assert calls["cmdstat_mget"] == 1 and calls["cmdstat_hget"] == 6 and calls["cmdstat_zrangebyscore"] == 1


def test_render_batch_reads_stdin_and_detaches(client: RenderClient) -> None:
    client.redis.flushdb()
    url = client.settings.redis_url
    text = "\n".join(json.dumps(GOOD | {"seed": i}) for i in range(3)) + "\n"
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", "-", "--name", "piped", "--detach", "--queue-anyway"],
        input=text,
        capture_output=True,
        text=True,
        env={**os.environ, "RENDER_REDIS_URL": url},
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "batch piped: 3 lines: 3 new",
        "follow it with: render batch status piped",
    ]
    assert queued_ids(client) == ["piped.00001", "piped.00002", "piped.00003"]
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", "status", "piped", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "RENDER_REDIS_URL": url},
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    report = json.loads(status.stdout)
    assert report["states"] == {"queued": 3} and [job["line"] for job in report["jobs"]] == [1, 2, 3]


def test_the_display_line_counts_rates_and_eta() -> None:
    stream = io.StringIO()
    display = BatchDisplay("night", stream, every=0.0)
    start = BatchProgress(10, Counter({"succeeded": 2, "queued": 8}), images=2)
    display.update(start)
    display.started -= 10.0  # ten seconds later: four more done, one running, one failed
    display.update(BatchProgress(10, Counter({"succeeded": 6, "failed": 1, "progress": 1, "queued": 2}), images=6))
    first, second = stream.getvalue().splitlines()
    assert first.startswith("batch night: 2/10 done, 0 running, 8 queued, 0 failed, revoked or expired, 0.00 images/s")
    assert second.startswith("batch night: 7/10 done, 1 running, 2 queued, 1 failed, revoked or expired, 0.40 images/s")
    assert second.endswith("ETA 6 s")  # 3 left at 5 jobs per 10 s
