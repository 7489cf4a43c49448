from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import torch

from localfarm.cluster import RedisServer
from worker.models.registry import ModelRegistry
from worker.settings import default_models


@pytest.fixture(scope="session")
def registry() -> ModelRegistry:
    """Both tiny pipelines, built once for the session, on the CPU in float32."""
    return ModelRegistry(default_models(), device=torch.device("cpu"), dtype=torch.float32, max_cached=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the tests of one module."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as started:
        yield started


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    """A connection to `server`, its database emptied first."""
    connection = redis.Redis.from_url(server.url)
    connection.flushdb()
    yield connection
    connection.close()
