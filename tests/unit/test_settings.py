"""Worker settings: the checks made at start-up."""

from __future__ import annotations

from typing import Any

import pytest

from producer import ConfigError
from producer.celery_config import base_config, sentinel_of
from producer.redis_connect import connect, sentinel_addresses
from worker.celery_app import create_app
from worker.settings import WorkerSettings, load_settings


def test_visibility_timeout_must_exceed_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_TASK_TIME_LIMIT", "3600")
    monkeypatch.setenv("RENDER_VISIBILITY_TIMEOUT", "3600")
    with pytest.raises(ConfigError, match=r"RENDER_VISIBILITY_TIMEOUT \(3600 s\) must exceed RENDER_TASK_TIME_LIMIT"):
        load_settings()
    monkeypatch.setenv("RENDER_VISIBILITY_TIMEOUT", "7200")
    settings = load_settings()
    assert (settings.task_time_limit, settings.visibility_timeout) == (3600, 7200)


def test_defaults_are_safe_together() -> None:
    settings = load_settings()
    assert settings.visibility_timeout > settings.task_time_limit + 60
    assert settings.lease_ttl < settings.task_time_limit


SENTINELS = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_a_sentinel_url_needs_the_master_s_name_and_well_formed_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_REDIS_URL", SENTINELS)
    with pytest.raises(ConfigError, match="set RENDER_REDIS_MASTER_NAME to the master's name"):
        load_settings()
    monkeypatch.setenv("RENDER_REDIS_MASTER_NAME", "farm")
    assert load_settings().redis_master_name == "farm"
    monkeypatch.setenv("RENDER_REDIS_URL", "sentinel://10.0.0.1:26379;redis://:t0psecret@10.0.0.2")
    with pytest.raises(
        ConfigError, match=r"'redis://:\*\*@10.0.0.2/' in the Redis URL: each entry is sentinel://"
    ) as err:
        load_settings()
    assert "t0psecret" not in str(err.value), "the password is never in the error"


def test_sentinel_settings_reach_the_broker_the_result_backend_and_every_client() -> None:
    hosts, master = sentinel_addresses(SENTINELS)
    assert hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)]
    assert master == {"password": "s3cret", "db": 2}
    conf = base_config(SENTINELS, master_name="farm", sentinel_password="sentinel-pw")
    options = {"master_name": "farm", "sentinel_kwargs": {"password": "sentinel-pw"}}
    assert conf["broker_transport_options"]["master_name"] == "farm"
    assert conf["broker_transport_options"]["sentinel_kwargs"] == options["sentinel_kwargs"]
    assert conf["result_backend_transport_options"] == options
    assert sentinel_of(conf["broker_transport_options"]) == {"master_name": "farm", "sentinel_password": "sentinel-pw"}
    assert sentinel_of(base_config("redis://localhost:6379/0")["broker_transport_options"]) == {
        "master_name": None,
        "sentinel_password": None,
    }
    assert conf["result_backend"].startswith("producer.celery_config.PollingSentinelBackend+sentinel://")
    app = create_app(WorkerSettings(redis_url=SENTINELS, redis_master_name="farm"))
    assert app.conf.broker_transport == "worker.process.transport:SentinelTransport"
    client = connect(SENTINELS, master_name="farm", socket_timeout=1)  # no connection until a command
    pool: Any = client.connection_pool  # redis-py's SentinelConnectionPool
    assert pool.service_name == "farm" and pool.connection_kwargs["db"] == 2
    ports = [sentinel.connection_pool.connection_kwargs["port"] for sentinel in pool.sentinel_manager.sentinels]
    assert ports == [26379, 26379, 26380]
    # A plain URL stays plain.
    assert "result_backend_transport_options" not in base_config("redis://localhost:6379/0")
