"""The values under the farm's keys and queues round-trip through `producer.records`, the one module that writes
and reads them."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.app.task import Context

from localfarm.cluster import RedisServer
from producer.celery_config import base_config
from producer.keys import ATTEMPT_HEADER, LOAD_FAILURES_HEADER, SUBMITTED_AT_HEADER, TASK_RENDER, priority_lists
from producer.records import Progress, Revocation, TaskMessage, WorkerInfo

MESSAGE = TaskMessage("job-1", '{"model": "tiny-sd15"}', "render.tiny-sd15", 3, 1_700_000_000.5, 2, 1)


def test_a_task_message_round_trips_as_json_and_as_a_running_record() -> None:
    assert TaskMessage.decode(MESSAGE.encode()) == MESSAGE
    assert TaskMessage.decode(MESSAGE.encode().encode()) == MESSAGE
    record = MESSAGE.running("gpu0@host:42")
    assert record["worker"] == "gpu0@host:42"
    assert TaskMessage.from_running("job-1", json.loads(json.dumps(record))) == MESSAGE
    older = {key: value for key, value in record.items() if key != "load_failures"}  # a record of an older worker
    assert TaskMessage.from_running("job-1", older) == dataclasses.replace(MESSAGE, load_failures=0)


def test_the_next_attempt_keeps_the_job_and_its_submission() -> None:
    again = MESSAGE.again(load_failures=2)
    assert (again.task_id, again.spec, again.queue, again.priority, again.submitted_at) == (
        MESSAGE.task_id,
        MESSAGE.spec,
        MESSAGE.queue,
        MESSAGE.priority,
        MESSAGE.submitted_at,
    )
    assert (again.attempt, again.load_failures) == (3, 2)


def test_a_sent_message_is_received_as_it_was_sent(tmp_path: Path) -> None:
    """Sent through a real broker and read back as Celery hands it to a task (its request context)."""
    with RedisServer(workdir=tmp_path) as server:
        app = Celery("records", set_as_current=False)
        app.conf.update(base_config(server.url, queue="render"))
        MESSAGE.send(app)
        client = redis.Redis.from_url(server.url)
        raw = client.rpop(priority_lists(MESSAGE.queue or "")["normal"])  # priority 3: kombu's list for that step
        assert isinstance(raw, bytes), "nothing was sent to the job's queue"
        envelope = json.loads(raw)
        headers = envelope["headers"]
        assert headers["task"] == TASK_RENDER and headers["id"] == MESSAGE.task_id
        assert (headers[SUBMITTED_AT_HEADER], headers[ATTEMPT_HEADER], headers[LOAD_FAILURES_HEADER]) == (
            MESSAGE.submitted_at,
            MESSAGE.attempt,
            MESSAGE.load_failures,
        )
        delivery = {"routing_key": envelope["properties"]["delivery_info"]["routing_key"]}
        request = Context({**headers, "delivery_info": {**delivery, "priority": envelope["properties"]["priority"]}})
        body_args = json.loads(base64.b64decode(envelope["body"]))[0]
        assert TaskMessage.received(request, body_args[0]) == MESSAGE
        client.close()
        app.close()


def test_progress_round_trips_as_its_state_s_meta() -> None:
    assert Progress.from_meta(json.loads(json.dumps(Progress(12, 20).meta()))) == Progress(12, 20)
    for meta in (None, {}, {"step": 3}, {"step": "x", "total": 2}, ["step", 1]):
        assert Progress.from_meta(meta) is None


def test_a_revocation_round_trips_as_its_key_s_value_and_as_a_notice() -> None:
    revoked = Revocation(1_700_000_123.25, "job-1")
    assert Revocation.read(revoked.value()) == Revocation(revoked.at)
    assert Revocation.read(revoked.notice().encode()) == revoked
    assert Revocation.read(json.dumps({"at": None})) == Revocation(None)  # revoked, when unknown
    for raw in (None, b"1", b"not json", b'["at"]'):
        assert Revocation.read(raw) is None


def put(client: redis.Redis, key: str, fields: Mapping[str, Any]) -> None:
    client.hset(key, mapping={name: value for name, value in fields.items()})  # redis-py's key and value types


def test_a_worker_advert_round_trips_through_its_hash_in_redis(tmp_path: Path) -> None:
    """The three parts a worker writes (heartbeat, job in hand and step, models loaded) read back as one WorkerInfo,
    through a real Redis hash (values come back as bytes)."""
    with RedisServer(workdir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        key = "render:worker:gpu0@host"
        beat = WorkerInfo.beat_fields(
            "gpu0@host",
            models=["tiny-sd15", "tiny-sdxl"],
            queues=["render.tiny-sd15", "render.tiny-sdxl", "render"],
            families={"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"},
            pid=42,
            started_at=1_700_000_000.25,
            last_seen=1_700_000_100.5,
            ttl=15.0,
        )
        put(client, key, beat)
        idle = WorkerInfo.from_hash(client.hgetall(key))
        assert idle == WorkerInfo(
            hostname="gpu0@host",
            models=["tiny-sd15", "tiny-sdxl"],
            loaded=[],
            queues=["render.tiny-sd15", "render.tiny-sdxl", "render"],
            job=None,
            step=None,
            total=None,
            loads={},
            last_seen=1_700_000_100.5,
            started_at=1_700_000_000.25,
            pid=42,
            ttl=15.0,
            families={"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"},
        ), "a worker with nothing in hand or loaded yet"

        put(client, key, {**WorkerInfo.job_fields("job-1"), **WorkerInfo.load_fields(["tiny-sd15"], {"tiny-sd15": 2})})
        taken = WorkerInfo.from_hash(client.hgetall(key))
        assert (taken.job, taken.step, taken.total, taken.loaded, taken.loads) == (
            "job-1",
            None,
            None,
            ["tiny-sd15"],
            {"tiny-sd15": 2},
        )
        put(client, key, WorkerInfo.progress_fields(7, 20))
        running = WorkerInfo.from_hash(client.hgetall(key))
        assert (running.job, running.step, running.total) == ("job-1", 7, 20)
        put(client, key, WorkerInfo.job_fields(None))
        ended = WorkerInfo.from_hash(client.hgetall(key))
        assert (ended.job, ended.step, ended.total, ended.loaded) == (None, None, None, ["tiny-sd15"])
        assert WorkerInfo.from_hash({}).hostname == "", "an expired hash reads as empty"
        client.close()
