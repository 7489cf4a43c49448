"""The worker's Celery settings: the ones that matter on GPUs, as DESIGN.md requires them."""

from __future__ import annotations

import gc
import json
import logging
import pickle
import ssl
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.signals import task_received
from flower.utils import broker as flower_broker

from localfarm.cluster import RedisServer
from producer.celery_config import tls_options
from producer.client import RenderClient, redacted
from producer.keys import TASK_RENDER
from worker.celery_app import create_app, worker_argv
from worker.settings import WorkerSettings, default_models


def test_gpu_settings() -> None:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", task_time_limit=600, visibility_timeout=1200)
    conf = create_app(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # One process; a thread per job in hand: one call's batch (1 image here) and one prefetched job.
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 2 and conf.worker_pool == "threads"
    assert conf.broker_transport_options["visibility_timeout"] == 1200 > settings.task_time_limit
    assert conf.accept_content == ["json"] and conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert not conf.task_track_started  # the task sets STARTED when the GPU takes the job, not when a thread does


def test_the_broker_transport_options_are_json_as_inspect_stats_sends_them() -> None:
    """`celery inspect stats` and Flower's worker page carry the broker connection's options in a JSON reply."""
    app = create_app(WorkerSettings(redis_url="redis://127.0.0.1:1/0"))
    with app.connection() as connection:
        info = connection.info()
    assert json.loads(json.dumps(info["transport_options"])) == app.conf.broker_transport_options


def test_inspect_stats_shows_no_password_of_the_redis_or_its_sentinels() -> None:
    """The connection's info, which `inspect stats` sends and Flower's worker page shows, masks both passwords."""
    settings = WorkerSettings(
        redis_url="sentinel://:redis-pw@10.0.0.1:26379/2;sentinel://:redis-pw@10.0.0.2:26379",
        redis_master_name="farm",
        redis_sentinel_password="sentinel-pw",
    )
    app = create_app(settings)
    with app.connection() as connection:
        shown = json.dumps(connection.info())
        assert "master_name" in shown and "sentinel-pw" not in shown
        assert connection.transport_options["sentinel_kwargs"] == {"password": "sentinel-pw"}  # the channel's own
        copy = pickle.loads(pickle.dumps(connection))
        assert copy.transport_options == connection.transport_options and copy.as_uri() == connection.as_uri()
    assert app.conf.broker_transport_options["sentinel_kwargs"] == {"password": "sentinel-pw"}  # Flower's sentinels


@pytest.mark.parametrize(
    ("url", "extra", "client", "shown"),
    [
        ("redis://:pw@10.0.0.5:6380/2", {}, flower_broker.Redis, "redis://:**@10.0.0.5:6380/2"),
        ("rediss://:pw@10.0.0.5:6380/2?ssl_cert_reqs=none", {}, flower_broker.RedisSsl, "rediss://:**@10.0.0.5:6380/2"),
        (
            "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2:26379",
            {"redis_master_name": "farm"},
            flower_broker.RedisSentinel,
            "sentinel://:**@10.0.0.1:26379/2",
        ),
    ],
)
def test_flower_finds_its_redis_broker_client_from_the_app_s_connection(
    url: str, extra: dict[str, Any], client: type[Any], shown: str
) -> None:
    """Flower picks its broker client (Broker tab, queue lengths) by the scheme of the connection's URL."""
    app = create_app(WorkerSettings(redis_url=url, **extra))
    with app.connection() as connection:
        assert connection.as_uri() == shown
        found = flower_broker.Broker(
            connection.as_uri(include_password=True),
            broker_options=app.conf.broker_transport_options,
            broker_use_ssl=app.conf.broker_use_ssl,
        )
    assert type(found) is client and found.password == "pw" and found.port in (6380, 26379)


def test_the_task_is_registered_under_its_one_name() -> None:
    app = create_app(WorkerSettings(redis_url="redis://127.0.0.1:1/0"))
    assert TASK_RENDER in app.tasks


class _Consumer:  # what Celery sends `task_received` from: the worker's consumer, which knows its app
    def __init__(self, app: Any) -> None:
        self.app = app


def test_a_message_the_consumer_receives_marks_its_own_apps_deliveries() -> None:
    """Celery sends `task_received` on the consumer's thread; the GPU thread reads it as "a burst is arriving"."""
    app, other = (create_app(WorkerSettings(redis_url="redis://127.0.0.1:1/0")) for _ in range(2))
    before = app.deliveries.last
    task_received.send(sender=_Consumer(app), request=None)
    assert app.deliveries.last > before
    assert other.deliveries.last == float("-inf"), "another app in the process is not marked"


def test_worker_flags() -> None:
    argv = worker_argv(WorkerSettings(queue="gpu-a100", max_batch=4, prefetch=2), hostname="gpu0@%h", loglevel="INFO")
    assert {
        "--pool=threads",
        "--concurrency=6",  # jobs in hand: a batch of 4, and 2 more loading while it runs
        "--prefetch-multiplier=1",
        "--events",
        # One per model served, then the bare queue.
        "--queues=" + ",".join([*(f"gpu-a100.{model}" for model in default_models()), "gpu-a100"]),
        "--hostname=gpu0@%h",
    } <= set(argv)


def test_sending_a_job_opens_no_result_subscription_and_a_dead_redis_stalls_no_finalizer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Celery's stock backend subscribes per task sent and, once Redis is gone, retries for ~20 s in
    `AsyncResult.__del__`. The client polls instead, so neither may happen."""
    with RedisServer(workdir=tmp_path) as server:
        client = RenderClient(redis_url=server.url)
        handle = client.submit({"model": "tiny-sd15", "prompt": "no pubsub"}, wait_for_worker=True)
        results = [client.app.send_task(TASK_RENDER, args=["{}"])]  # held, and dropped once Redis is gone
        with redis.Redis.from_url(server.url) as direct:
            assert direct.pubsub_channels() == [] and direct.pubsub_numpat() == 0
        assert handle.status().state == "queued"
    caplog.set_level(logging.ERROR)
    del results
    gc.collect()
    assert not [r for r in caplog.records if "Connection to Redis lost" in r.getMessage()]
    client.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/2", "redis://:***@10.0.0.5:6379/2"),
        ("redis://render:s3cret@redis.internal/0", "redis://render:***@redis.internal/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [("required", ssl.CERT_REQUIRED), ("CERT_OPTIONAL", ssl.CERT_OPTIONAL), ("none", ssl.CERT_NONE)],
)
def test_tls_certificate_checks_read_as_kombu_reads_them(value: str, expected: int) -> None:
    options = tls_options(f"rediss://127.0.0.1:6380/0?ssl_cert_reqs={value}&ssl_ca_certs=/etc/ca.pem")
    assert options["broker_use_ssl"] == {"ssl_cert_reqs": expected, "ssl_ca_certs": "/etc/ca.pem"}
    assert options["redis_backend_use_ssl"] == options["broker_use_ssl"]
    assert tls_options("rediss://127.0.0.1:6380/0")["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options("redis://127.0.0.1:6379/0") == {}


def test_an_unknown_certificate_check_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"ssl_cert_reqs='maybe' in the Redis URL; use required, optional or none"):
        tls_options("rediss://127.0.0.1:6380/0?ssl_cert_reqs=maybe")
