"""Least privilege on Redis: the users `render redis-acl` makes, on a real redis-server with the default user off, run
a real worker, a tenant's producer and Flower with nothing denied, and refuse what each role must not do."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from localfarm.cluster import RedisServer, WorkerProcess, wait_until
from producer.client import RenderClient
from producer.keys import RUNNING_TASKS, job_key, lease_key, manifest_key, revocations_channel
from producer.settings import ClientSettings
from tests.helpers import free_port, http_answers
from tests.integration.conftest import LONG, Farm, spec

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

TENANTS: dict[str, dict[str, Any]] = {"team-a": {}, "team-b": {}}
ADMIN = ("admin", f"admin-{uuid.uuid4().hex}")
PASSWORDS = {
    "worker": ("RENDER_ACL_PASSWORD_WORKER", f"w-{uuid.uuid4().hex}"),
    "service": ("RENDER_ACL_PASSWORD_SERVICE", f"s-{uuid.uuid4().hex}"),
    "monitor": ("RENDER_ACL_PASSWORD_MONITOR", f"m-{uuid.uuid4().hex}"),
    "producer.team-a": ("RENDER_ACL_PASSWORD_PRODUCER_TEAM_A", f"a-{uuid.uuid4().hex}"),
    "producer.team-b": ("RENDER_ACL_PASSWORD_PRODUCER_TEAM_B", f"b-{uuid.uuid4().hex}"),
}


@dataclass
class AclFarm:
    farm: Farm
    server: RedisServer
    admin: redis.Redis
    producer: RenderClient
    applied: subprocess.CompletedProcess[str]

    def url(self, user: str) -> str:
        password = ADMIN[1] if user == "admin" else PASSWORDS[user][1]
        return f"redis://{user}:{password}@127.0.0.1:{self.server.port}/0"

    def denials(self) -> list[dict[str, Any]]:
        """ACL LOG since the last call: who was refused what."""
        entries = [{k: e[k] for k in ("username", "reason", "object", "context")} for e in self.admin.acl_log()]
        self.admin.acl_log_reset()
        return entries

    def allowed(self, user: str, *command: str) -> bool:
        """ACL DRYRUN: whether `user` may run `command` (nothing runs)."""
        try:
            return bool(self.admin.execute_command("ACL", "DRYRUN", user, *command) in (b"OK", "OK"))
        except redis.ResponseError:  # an unknown command or a wrong number of arguments
            return False


def acl_env() -> dict[str, str]:
    return {variable: password for variable, password in PASSWORDS.values()} | {"RENDER_TENANTS": json.dumps(TENANTS)}


def redis_acl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "redis-acl", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.fixture(scope="module")
def acl_farm(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclFarm]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("acl-redis")).start()
    bootstrap = redis.Redis(port=server.port)
    bootstrap.execute_command("ACL", "SETUSER", ADMIN[0], "on", f">{ADMIN[1]}", "~*", "&*", "+@all")
    bootstrap.close()
    admin_url = f"redis://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{server.port}/0"
    applied = redis_acl("--apply", env=acl_env() | {"RENDER_ACL_ADMIN_URL": admin_url})
    admin = redis.Redis.from_url(admin_url)
    bucket = f"acl-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    worker_url = f"redis://worker:{PASSWORDS['worker'][1]}@127.0.0.1:{server.port}/0"
    farm = Farm(worker_url, bucket, s3_server, tmp_path_factory.mktemp("acl-logs"), RenderClient(redis_url=admin_url))
    producer_url = f"redis://producer.team-a:{PASSWORDS['producer.team-a'][1]}@127.0.0.1:{server.port}/0"
    producer = RenderClient(ClientSettings(redis_url=producer_url, tenant="team-a"))
    try:
        assert applied.returncode == 0, applied.stderr
        farm.start_workers("guarded", tenants=json.dumps(TENANTS))
        yield AclFarm(farm, server, admin, producer, applied)
    finally:
        WorkerProcess.stop_all(farm.workers)
        producer.close()
        farm.client.close()
        admin.close()
        server.stop()


def test_the_command_sets_every_user_turns_default_off_and_prints_no_password(acl_farm: AclFarm) -> None:
    out = acl_farm.applied.stdout + acl_farm.applied.stderr
    assert sorted(line.removeprefix("set ACL user ") for line in out.splitlines() if "set ACL user" in line) == sorted(
        PASSWORDS
    )
    assert "turned the default user off" in out
    assert not [user for user, (_, password) in PASSWORDS.items() if password in out]
    listed = "\n".join(str(rule) for rule in acl_farm.admin.acl_list())
    assert not [user for user, (_, password) in PASSWORDS.items() if password in listed], "stored as hashes only"
    with pytest.raises(redis.AuthenticationError):  # no password: the default user, which is off
        redis.Redis(port=acl_farm.server.port).ping()


def test_a_tenant_s_producer_submits_follows_and_revokes_with_nothing_denied(acl_farm: AclFarm) -> None:
    producer = acl_farm.producer
    acl_farm.denials()
    handle = producer.submit(spec(seed=7))
    assert handle.task_id.startswith("team-a@")
    assert producer.wait(handle.task_id, timeout=120).status == "succeeded"
    assert producer.status(handle.task_id).state == "succeeded"
    assert handle.task_id in [s.task_id for s in producer.jobs()[0]]
    assert [w.hostname for w in producer.workers()] == [acl_farm.farm.workers[0].hostname]

    long = producer.submit(LONG)
    wait_until(lambda: producer.status(long.task_id).state == "progress", timeout=120, what="the long job's steps")
    assert acl_farm.admin.exists(lease_key(long.task_id)), "the job holds its lease while the producer looks"
    assert acl_farm.denials() == [], "submit, wait, status, listing: every command the producer sent was allowed"
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.redis.get(lease_key(long.task_id))
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.redis.hgetall(RUNNING_TASKS)
    acl_farm.denials()
    assert producer.revoke(long.task_id) == "revoked"
    final = list(producer.follow(long.task_id, timeout=120))[-1]
    assert final.state == "revoked" and final.manifest is not None
    assert acl_farm.denials() == [], "revoke and follow were allowed in full"


def test_a_producer_cannot_administer_read_others_jobs_or_the_event_stream(acl_farm: AclFarm) -> None:
    other = f"team-b@{uuid.uuid4().hex}"
    for key in (f"celery-task-meta-{other}", manifest_key(other)):
        acl_farm.admin.set(key, json.dumps({"secret": "team-b's prompt"}))
    acl_farm.admin.hset(job_key(other), "queue", "team-b@render.tiny-sd15")
    db = acl_farm.producer.redis
    for denied in (
        lambda: db.flushall(),
        lambda: db.flushdb(),
        lambda: db.config_get("*"),
        lambda: db.keys("*"),
        lambda: db.acl_list(),
        lambda: db.get(f"celery-task-meta-{other}"),
        lambda: db.hgetall(job_key(other)),
        lambda: db.get(manifest_key(other)),
        lambda: db.lrange("team-b@render.tiny-sd15", 0, -1),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied()
    # Straight on a connection: the refusal is the first reply (redis-py's PubSub would read it later).
    for command in (("SUBSCRIBE", "/0.celeryev/task.succeeded"), ("SUBSCRIBE", f"celery-task-meta-{other}")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            db.execute_command(*command)
    with pytest.raises(redis.exceptions.NoPermissionError):
        db.execute_command("PSUBSCRIBE", "*")
    assert acl_farm.producer.status(other).state == "unknown"  # and the client does not ask
    # The same as a matrix of what each role may do (ACL DRYRUN, nothing runs).
    lease = lease_key("team-a@x")
    for user in ("producer.team-a", "service"):
        assert not acl_farm.allowed(user, "GET", lease), user
        assert not acl_farm.allowed(user, "HGET", RUNNING_TASKS, "x"), user
        assert not acl_farm.allowed(user, "SCRIPT", "FLUSH"), user
        assert not acl_farm.allowed(user, "SUBSCRIBE", "/0.celeryev/task.sent"), user
        assert acl_farm.allowed(user, "PUBLISH", revocations_channel("w@h:1"), "x"), user
    assert acl_farm.allowed("service", "GET", f"celery-task-meta-{other}")
    assert acl_farm.allowed("producer.team-a", "LLEN", "team-b@render.tiny-sd15"), "RENDER_MAX_QUEUED's count"
    assert acl_farm.allowed("worker", "GET", lease) and acl_farm.allowed("worker", "EVALSHA", "0" * 40, "0")
    assert acl_farm.allowed("monitor", "GET", f"celery-task-meta-{other}")
    admin_commands: list[tuple[str, ...]] = [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "save", ""),
        ("ACL", "LIST"),
        ("DEBUG", "SLEEP", "0"),
    ]
    for user in ("worker", "monitor"):
        for admin_command in admin_commands:
            assert not acl_farm.allowed(user, *admin_command), (user, admin_command)
    assert not acl_farm.allowed("worker", "SHUTDOWN")
    assert not acl_farm.allowed("monitor", "SET", lease, "x") and not acl_farm.allowed(
        "monitor", "LPUSH", "render", "x"
    )


def test_flower_as_the_monitor_user_lists_the_worker_and_inspects_it(
    acl_farm: AclFarm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    port, auth = free_port(), "ops:flower-acl"
    log = tmp_path_factory.mktemp("acl-flower") / "flower.log"
    env = {**os.environ, "RENDER_REDIS_URL": acl_farm.url("monitor"), "FLOWER_BASIC_AUTH": auth}
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
    ]
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> str:
        request = urllib.request.Request(base + path)
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())

    worker = acl_farm.farm.workers[0]
    acl_farm.denials()
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: http_answers(base + "/healthcheck"), timeout=60, what="flower", process=process, log=log)
            listed = lambda: worker.hostname in [row["hostname"] for row in json.loads(get("/workers?json=1"))["data"]]  # noqa: E731
            wait_until(listed, timeout=60, what="the worker in Flower's list (its event stream)", log=log)
            page = get(f"/worker/{worker.hostname}")  # the worker's stats, over Celery's inspect broadcast
            assert "Unable to get stats" not in page and f">{worker.pid}<" in page.replace(" ", "")
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert [d for d in acl_farm.denials() if d["username"] == "monitor"] == []


def test_the_acl_file_loads_into_redis_with_hashed_passwords_and_mode_600(acl_farm: AclFarm, tmp_path: Path) -> None:
    path = tmp_path / "users.acl"
    made = redis_acl("--file", str(path), "--keep-default", "--redis-version", "7.0", env=acl_env())
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert not [user for user, (_, password) in PASSWORDS.items() if password in text + made.stdout + made.stderr]
    with RedisServer(workdir=tmp_path, extra_args=["--aclfile", str(path)]) as loaded:
        assert sorted(redis.Redis(port=loaded.port, decode_responses=True).acl_users()) == sorted(
            [*PASSWORDS, "default"]
        )
        worker = redis.Redis(port=loaded.port, username="worker", password=PASSWORDS["worker"][1])
        assert worker.set("render:lease:x", "1") and worker.get("render:lease:x") == b"1"
        producer = redis.Redis(port=loaded.port, username="producer.team-a", password=PASSWORDS["producer.team-a"][1])
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.get("render:lease:x")


def test_the_command_says_what_is_missing_and_never_locks_the_admin_out(tmp_path: Path) -> None:
    neither = redis_acl(env=acl_env())
    assert neither.returncode == 2 and "give exactly one of --apply" in neither.stderr, neither.stderr
    nothing = redis_acl("--file", "-", env={"RENDER_TENANTS": "{}"})
    assert nothing.returncode == 2 and "RENDER_ACL_PASSWORD_WORKER" in nothing.stderr, nothing.stderr
    partial = redis_acl("--file", "-", env={"RENDER_ACL_PASSWORD_WORKER": "only-this", "RENDER_TENANTS": "{}"})
    assert partial.returncode == 0 and partial.stdout.startswith("user default off\nuser worker on #"), partial
    assert "skipped monitor: RENDER_ACL_PASSWORD_MONITOR is not set" in partial.stderr
    with RedisServer(workdir=tmp_path) as bare:  # an admin URL that logs in as `default`
        as_default = redis_acl("--apply", env=acl_env() | {"RENDER_ACL_ADMIN_URL": bare.url})
        assert as_default.returncode == 2 and "--keep-default" in as_default.stderr, as_default.stderr
        assert redis.Redis(port=bare.port).ping(), "still reachable: nothing was turned off"
