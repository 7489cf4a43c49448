"""The values under the farm's keys and queues round-trip through `producer.records`, the one module that writes
and reads them."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import redis
from celery import Celery
from celery.app.task import Context

from producer.celery_config import base_config
from producer.keys import ATTEMPT_HEADER, LOAD_FAILURES_HEADER, SUBMITTED_AT_HEADER, TASK_RENDER, priority_lists
from producer.records import TaskMessage
from worker.local_cluster import RedisServer

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
