"""The worker's dequeue records a job as delivered in the same step that takes it off its list, so a reply lost
on the way (Redis stopping, a cut connection, a killed worker) leaves a delivery the recovery scan restores, never
a job that is nowhere. A real redis-server and the worker app's own broker channel; no mocks."""

from __future__ import annotations

import json
import select
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.transport.virtual import Empty

from localfarm.cluster import RedisServer
from producer.keys import PRIORITIES, priority_lists
from producer.records import TaskMessage
from worker.celery_app import create_app
from worker.process import fairshare
from worker.process.recovery import RecoveryScanner
from worker.process.transport import Channel, Undecodable
from worker.settings import WorkerSettings

QUEUE = "render.tiny-sd15"
NORMAL = priority_lists(QUEUE)["normal"]


@pytest.fixture
def app(server: RedisServer, client: redis.Redis) -> Iterator[Any]:
    """A worker app on the module's redis-server (its database emptied by `client`)."""
    yield create_app(WorkerSettings(redis_url=server.url, models={"tiny-sd15": {"family": "sd15", "source": "tiny"}}))


@pytest.fixture
def channel(app: Any) -> Iterator[Channel]:
    """The worker's broker channel, consuming the tiny-sd15 queue; what it delivers is in `channel.delivered`."""
    with app.connection_for_read() as connection:
        chan = connection.default_channel
        assert isinstance(chan, Channel)
        connection.default_channel.client.script_load(fairshare.POP)  # as after the worker's first poll
        chan.delivered = []  # type: ignore[attr-defined]
        chan.basic_consume(QUEUE, False, chan.delivered.append, "test-consumer")  # type: ignore[attr-defined]
        yield chan


def send(app: Any, task_id: str, priority: str = "normal") -> None:
    spec = json.dumps({"model": "tiny-sd15", "prompt": task_id})
    TaskMessage(task_id, spec, QUEUE, PRIORITIES[priority], 1.0).send(app)


def start(channel: Channel) -> None:
    """Send the channel's next command on its own connection, as the worker's event loop does."""
    channel.connection.cycle._register_BRPOP(channel)


def unacked_ids(client: redis.Redis) -> list[str]:
    return sorted(json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked"))


def test_a_poll_whose_reply_is_lost_leaves_the_job_unacked_and_the_scan_puts_it_back(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    send(app, "lost-1")
    start(channel)  # the pop goes out, the server runs it ...
    sock = channel.client.connection._sock
    assert select.select([sock], [], [], 30)[0], "the server answered the pop"
    channel.client.connection.disconnect()  # ... and its reply is never read
    channel._in_poll = None  # type: ignore[assignment]
    assert client.llen(NORMAL) == 0, "the server took the job off its list"
    assert unacked_ids(client) == ["lost-1"], "and recorded it as delivered in the same step"
    assert client.zcard("unacked_index") == 1

    scanner = RecoveryScanner(app, client, interval=1.0, owner="test", storage=lambda: None, grace=0.0)  # type: ignore[arg-type,return-value]
    assert scanner.scan_once() == ["lost-1"]  # no lease, not final: an orphaned delivery
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    (restored,) = client.lrange(NORMAL, 0, -1)
    assert json.loads(restored)["headers"]["id"] == "lost-1"


def test_a_delivered_job_is_unacked_once_and_its_ack_clears_it(app: Any, channel: Channel, client: redis.Redis) -> None:
    send(app, "kept-1")
    start(channel)
    assert channel._brpop_read() is True
    (message,) = channel.delivered  # type: ignore[attr-defined]
    assert message.headers["id"] == "kept-1"
    assert unacked_ids(client) == ["kept-1"]  # the pop's record and the receipt's are one entry
    message.ack()
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_an_empty_poll_is_followed_by_a_wait_that_takes_nothing_off_the_list(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    start(channel)
    with pytest.raises(Empty):
        channel._brpop_read()  # every list empty
    start(channel)  # now the wait: BLMOVE of the normal list onto itself
    send(app, "waited-1")
    with pytest.raises(Empty):
        channel._brpop_read()  # woken by the job, which it leaves where it is
    assert client.llen(NORMAL) == 1 and client.hlen("unacked") == 0
    start(channel)
    assert channel._brpop_read() is True
    assert [m.headers["id"] for m in channel.delivered] == ["waited-1"]  # type: ignore[attr-defined]


def test_a_job_on_a_list_the_wait_does_not_watch_is_polled_after_the_wait(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    start(channel)
    with pytest.raises(Empty):
        channel._brpop_read()
    start(channel)
    send(app, "high-1", priority="high")
    with pytest.raises(Empty):
        channel._brpop_read()  # the wait ran out (render_poll_seconds)
    start(channel)
    assert channel._brpop_read() is True
    assert [m.headers["id"] for m in channel.delivered] == ["high-1"]  # type: ignore[attr-defined]


def test_a_restarted_redis_without_the_script_is_answered_by_loading_it(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    client.script_flush()
    send(app, "after-flush")
    start(channel)
    with pytest.raises(Empty):
        channel._brpop_read()  # NOSCRIPT: loaded, nothing popped
    assert client.llen(NORMAL) == 1
    start(channel)
    assert channel._brpop_read() is True


def test_items_that_are_no_message_are_dropped_and_leave_nothing_unacked(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    info = {"exchange": "", "routing_key": QUEUE}
    properties = {"body_encoding": "base64", "delivery_tag": "t-1", "delivery_info": info}
    envelope = {"body": "e", "content-type": "application/json", "headers": {}, "properties": properties}
    client.lpush(NORMAL, "not json", json.dumps(envelope))  # a body that is not base64: kombu cannot read it
    start(channel)
    with pytest.raises(Empty):
        channel._brpop_read()  # "not json": never recorded
    assert client.hlen("unacked") == 0
    start(channel)
    channel._brpop_read()  # recorded by the pop, forgotten when the message could not be made, and dropped
    assert channel.delivered == []  # type: ignore[attr-defined]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    client.lpush(NORMAL, json.dumps(envelope))
    with pytest.raises(Undecodable):
        channel.basic_get(QUEUE)  # the synchronous path the same way
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_a_queue_consumed_without_acks_leaves_nothing_recorded_as_delivered(
    app: Any, channel: Channel, client: redis.Redis
) -> None:
    replies = "replies.celery.pidbox"  # as Celery's inspect consumes its reply queue: no acks
    channel.basic_consume(replies, True, channel.delivered.append, "reply-consumer")  # type: ignore[attr-defined]
    with app.connection_for_write() as connection:
        connection.default_channel.basic_publish(
            connection.default_channel.prepare_message("pong", content_type="text/plain"),
            exchange="",
            routing_key=replies,
        )
    start(channel)
    assert select.select([channel.client.connection._sock], [], [], 30)[0], "the server answered the pop"
    assert channel._brpop_read()
    assert [m.body for m in channel.delivered] == [b"pong"]  # type: ignore[attr-defined]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0, "a no-ack delivery stays unrecorded"
