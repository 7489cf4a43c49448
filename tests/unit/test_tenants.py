"""Tenants at submit: ids, queues and keys carry the tenant; the farm's declared tenants, quotas and default deadlines
are what a submit checks and applies. A real redis-server; the submits enqueue real Celery messages."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

from localfarm.cluster import RedisServer
from producer import tenants
from producer.client import RenderClient
from producer.errors import ConfigError, QueueFull, QuotaExceeded, SpecError, UnknownTenant
from producer.keys import (
    active_list,
    check_task_id,
    image_object,
    job_key,
    manifest_object,
    priority_lists,
    scoped_id,
    tenant_of,
    tenant_queue,
    unscoped,
)
from producer.settings import ClientSettings, load
from producer.tenants import TenantConfig, parse_tenants

SPEC = {"model": "tiny-sd15", "prompt": "a lighthouse"}
QUEUE = "render.tiny-sd15"


@pytest.fixture
def farm(server: RedisServer, client: redis.Redis) -> Iterator[redis.Redis]:
    """The farm's Redis with its declared tenants, as a worker publishes them at start."""
    tenants.publish(
        client,
        parse_tenants('{"team-a": {"max_queued": 3, "deadline_seconds": 600}, "team-b": {"weight": 2}}'),
    )
    yield client


def client_of(server: RedisServer, tenant: str) -> RenderClient:
    return RenderClient(ClientSettings(redis_url=server.url, tenant=tenant))


def test_a_tenant_s_id_queue_and_folder_carry_its_name() -> None:
    assert scoped_id("team-a", "abc") == "team-a@abc" == scoped_id("team-a", "team-a@abc")
    assert scoped_id("default", "abc") == "abc"
    with pytest.raises(SpecError, match="belongs to tenant 'team-b'"):
        scoped_id("team-a", "team-b@abc")
    assert check_task_id("team-a@abc") == "team-a@abc" and tenant_of("team-a@abc") == "team-a"
    for bad in ("@abc", "Team@abc", "a@b@c", "team-a@../x"):
        with pytest.raises(SpecError, match="task_id"):
            check_task_id(bad)
    assert tenant_queue(QUEUE, "team-a") == "team-a@render.tiny-sd15" and unscoped("team-a@render.tiny-sd15") == QUEUE
    assert image_object("team-a@abc", 0) == "team-a@abc/image-0.png"
    assert not image_object("team-a", 0).startswith("team-a@")  # a default job named like a tenant is not its
    assert manifest_object("abc") == "abc/manifest.json"  # the default tenant keeps the layout from before
    assert active_list("team-a@render.tiny-sd15") == active_list(QUEUE)  # what autoscalers count, per model


def test_the_tenants_a_worker_serves_are_default_and_each_declared_one_once() -> None:
    assert tenants.names({}) == ["default"]
    assert tenants.names(parse_tenants('{"b": {}, "default": {"weight": 2}, "a": {}}')) == ["default", "a", "b"]


def test_render_tenants_is_checked_entry_by_entry() -> None:
    assert parse_tenants("") == {}
    assert parse_tenants('{"a": {"weight": 0.5}}') == {"a": TenantConfig(weight=0.5)}
    for text, problem in (
        ("[1]", "JSON object"),
        ("{x", "not JSON"),
        ('{"Team A": {}}', "not a tenant name"),
        ('{"a": {"weight": 0}}', "tenant 'a': weight"),
        ('{"a": {"max_gpu": 1}}', "tenant 'a': max_gpu"),
    ):
        with pytest.raises(ValueError, match=problem):
            parse_tenants(text)


def test_a_bad_render_tenant_stops_the_client_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_TENANT", "Team A")
    with pytest.raises(ConfigError, match="RENDER_TENANT: .*lowercase"):
        load(ClientSettings)


def test_a_submit_over_the_quota_is_refused_and_enqueues_nothing(server: RedisServer, farm: redis.Redis) -> None:
    team_a = client_of(server, "team-a")
    handles = team_a.submit_many([SPEC, SPEC], wait_for_worker=True)
    assert all(h.task_id.startswith("team-a@") for h in handles)
    lists = priority_lists(tenant_queue(QUEUE, "team-a")).values()
    before = sum(int(farm.llen(name)) for name in lists)
    assert before == 2
    with pytest.raises(QuotaExceeded, match=r"'team-a' .* 2 queued \+ 2 submitted > max_queued=3") as refused:
        team_a.submit_many([SPEC, SPEC], wait_for_worker=True)
    assert isinstance(refused.value, QueueFull) and refused.value.retry_after > 0  # what HTTP answers 429 with
    assert sum(int(farm.llen(name)) for name in lists) == 2  # nothing of the refused submit was enqueued
    assert farm.zcard("render:t:team-a:jobs") == 2
    team_a.submit(SPEC, wait_for_worker=True)  # the one that fits still goes
    team_b = client_of(server, "team-b")  # another tenant's room is its own
    team_b.submit_many([SPEC] * 4, wait_for_worker=True)


def test_a_tenant_s_default_deadline_applies_to_jobs_that_set_none(server: RedisServer, farm: redis.Redis) -> None:
    team_a = client_of(server, "team-a")
    defaulted = team_a.submit(SPEC, wait_for_worker=True).task_id
    own = team_a.submit({**SPEC, "deadline_seconds": 30}, wait_for_worker=True).task_id
    specs = {}
    for raw in farm.lrange(tenant_queue(QUEUE, "team-a") + "\x06\x163", 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        specs[message["headers"]["id"]] = json.loads(args[0])
    assert specs[defaulted]["deadline_seconds"] == 600 and specs[own]["deadline_seconds"] == 30
    assert set(farm.zrange("render:t:team-a:deadlines", 0, -1)) == {defaulted.encode(), own.encode()}


def test_an_undeclared_tenant_is_refused_before_anything_is_written(server: RedisServer, farm: redis.Redis) -> None:
    with pytest.raises(UnknownTenant, match="'team-z' .* declare default, team-a, team-b: add it to RENDER_TENANTS"):
        client_of(server, "team-z").submit(SPEC, wait_for_worker=True)
    assert farm.keys("*team-z*") == []


def test_a_tenant_reads_only_its_own_jobs(server: RedisServer, farm: redis.Redis) -> None:
    mine = client_of(server, "team-a").submit(SPEC, wait_for_worker=True).task_id
    other = client_of(server, "team-b")
    assert other.status(mine).state == "unknown"  # as if it did not exist
    assert other.revoke(mine) == "unknown" and farm.exists(job_key(mine))
    assert client_of(server, "default").status(mine).state == "queued"  # the farm operator's client sees every job
    assert client_of(server, "team-a").status(mine).tenant == "team-a"
