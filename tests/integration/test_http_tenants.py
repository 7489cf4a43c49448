"""Tenants over HTTP (issue 33): each API key acts as its tenant, on a real uvicorn server over a real Redis and a
real worker that declares RENDER_TENANTS (team-a with max_queued 2, team-b without a quota).

A tenant's key sees and cancels its own jobs only (another tenant's job answers 404 exactly as an unknown id), a
`default` key (the operator's) reads every job, a submit over the tenant's quota is 429 `quota_exceeded` with
Retry-After and enqueues nothing, and a key of a tenant the workers do not declare is 403 `unknown_tenant`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest

from producer.errors import ConfigError
from producer.keys import job_index_key, model_queue, priority_lists, tenant_queue, unscoped
from producer.settings import load
from service.auth import Keys, hash_key
from service.settings import ApiKey, ServiceSettings
from tests.helpers import render_here, wait_until
from tests.integration.conftest import LONG, Farm, spec
from tests.integration.test_http_api import call, serving

pytestmark = [pytest.mark.integration]

TENANTS = {"team-a": {"max_queued": 2}, "team-b": {}}
KEYS = {  # key name -> (the key, its tenant)
    "team-a-ci": ("key-a", "team-a"),
    "team-b-ci": ("key-b", "team-b"),
    "operator": ("key-ops", "default"),
    "stranger": ("key-z", "team-z"),  # a tenant the workers do not declare
}
QUICK = spec(num_inference_steps=4)
UNSERVED = "unserved-model"  # no worker serves it: jobs for it stay queued


def key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


@pytest.fixture(scope="module")
def tenant_farm(farm_factory: Callable[[], Farm], tmp_path_factory: pytest.TempPathFactory) -> tuple[Farm, str]:
    """One worker declaring the tenants, writing to a file:// storage the service serves from."""
    made = farm_factory()
    storage = tmp_path_factory.mktemp("storage").as_uri()
    made.start_workers("alpha", storage_url=storage, tenants=json.dumps(TENANTS))
    return made, storage


@pytest.fixture(scope="module")
def port(tenant_farm: tuple[Farm, str]) -> Iterator[int]:
    farm, storage = tenant_farm
    keys = {name: ApiKey(hash=hash_key(secret), tenant=tenant) for name, (secret, tenant) in KEYS.items()}
    with serving(ServiceSettings(redis_url=farm.redis_url, storage_url=storage, api_keys=keys)) as found:
        yield found


def same_404(port: int, method: str, path: str, task_id: str, unknown_id: str) -> None:
    """team-b's answer about `task_id` is the 404 it gets for `unknown_id` (an id never submitted), ids aside."""
    status, _, answer = call(port, method, path.format(task_id), headers=key("team-b-ci"))
    never_status, _, never = call(port, method, path.format(unknown_id), headers=key("team-b-ci"))
    assert (status, never_status) == (404, 404), (path, answer, never)
    assert json.dumps(answer).replace(task_id, "ID") == json.dumps(never).replace(unknown_id, "ID"), path


def listed(port: int, who: str, query: str = "") -> list[str]:
    status, _, page = call(port, "GET", f"/v1/jobs?limit=1000{query}", headers=key(who))
    assert status == 200, page
    return [job["id"] for job in page["jobs"]]


def test_a_tenants_job_is_its_own_and_the_operators(port: int) -> None:
    status, _, batch = call(
        port, "POST", "/v1/batches?name=nightly", [spec(seed=5, num_inference_steps=4)], key("team-a-ci")
    )
    assert status == 201, batch
    once = {**key("team-a-ci"), "Idempotency-Key": "order-1"}
    status, _, job = call(port, "POST", "/v1/jobs", QUICK, {**once, "Prefer": "wait=60"})
    assert (status, job["status"], job["tenant"]) == (201, "succeeded", "team-a"), job
    task_id = job["id"]
    assert call(port, "POST", "/v1/jobs", QUICK, once)[:3:2] == (200, job)  # the tenant's own idempotency keys
    status, _, other = call(port, "POST", "/v1/jobs", QUICK, {**key("team-b-ci"), "Idempotency-Key": "order-1"})
    assert status == 201 and other["id"] != task_id, other  # team-b's key of the same name is its own
    assert task_id.startswith("team-a@")
    images = [item["url"] for item in job["files"] if item["kind"] == "image"]
    assert images and all(unquote(url).startswith(f"/v1/files/{task_id}/") for url in images)
    status, headers, data = call(port, "GET", images[0], headers=key("team-a-ci"))
    assert (status, headers["content-type"], data[:4]) == (200, "image/png", b"\x89PNG")

    # team-b cannot tell team-a's job from one never submitted, by any route.
    unknown = "team-a@never-submitted"
    for method, path in (
        ("GET", "/v1/jobs/{}"),
        ("GET", "/v1/jobs/{}/events"),
        ("GET", "/v1/jobs/{}/files"),
        ("POST", "/v1/jobs/{}/cancel"),
    ):
        same_404(port, method, path, task_id, unknown)
    missing = images[0].replace(unscoped(task_id), unscoped(unknown))
    status, _, answer = call(port, "GET", images[0], headers=key("team-b-ci"))
    _, _, never = call(port, "GET", missing, headers=key("team-b-ci"))
    assert status == 404 and answer["error"]["message"] == never["error"]["message"].replace(
        unscoped(unknown), unscoped(task_id)
    )
    assert task_id not in listed(port, "team-b-ci")
    assert task_id in listed(port, "team-a-ci")
    assert call(port, "GET", f"/v1/jobs/{task_id}")[0] == 401  # no key at all: not even a 404

    # The default tenant's key is the operator's: it reads every tenant's jobs and files by id.
    status, _, seen = call(port, "GET", f"/v1/jobs/{task_id}", headers=key("operator"))
    assert (status, seen["tenant"], seen["status"]) == (200, "team-a", "succeeded")
    assert call(port, "GET", images[0], headers=key("operator"))[0] == 200

    # A tenant's batch: its jobs are `team-a@<name>.<line>`, shown with their batch; team-b knows no such batch.
    def finished() -> bool:
        return call(port, "GET", "/v1/batches/nightly", headers=key("team-a-ci"))[2]["counts"] == {"succeeded": 1}

    wait_until(finished, timeout=120, what="team-a's batch to finish")
    status, _, page = call(port, "GET", "/v1/jobs?batch=nightly", headers=key("team-a-ci"))
    assert [(j["id"], j["batch"], j["model"]) for j in page["jobs"]] == [
        ("team-a@nightly.00001", "nightly", "tiny-sd15")
    ]
    assert call(port, "GET", "/v1/batches/nightly", headers=key("team-b-ci"))[0] == 404
    assert call(port, "POST", "/v1/batches/nightly/cancel", headers=key("team-b-ci"))[0] == 404


def test_another_tenants_cancel_leaves_a_running_job_alone(port: int) -> None:
    status, _, job = call(port, "POST", "/v1/jobs", LONG, key("team-a-ci"))
    assert status == 201, job
    task_id = job["id"]

    def in_hand(who: str) -> list[Any]:
        return [worker["job"] for worker in call(port, "GET", "/v1/workers", headers=key(who))[2]["workers"]]

    wait_until(lambda: task_id in in_hand("team-a-ci"), timeout=120, what="a worker to hold team-a's long job")
    assert task_id not in in_hand("team-b-ci"), "the fleet view told team-b of team-a's job"
    assert call(port, "POST", f"/v1/jobs/{task_id}/cancel", headers=key("team-b-ci"))[0] == 404
    final = poll_as(port, task_id, "team-a-ci")
    assert final["status"] == "succeeded", "team-b's cancel stopped team-a's job"


def poll_as(port: int, task_id: str, who: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        seen[:] = [call(port, "GET", f"/v1/jobs/{task_id}", headers=key(who))[2]]
        return seen[0]["status"] not in ("queued", "started", "progress")

    wait_until(done, timeout=180, what=f"{task_id} to end", interval=0.1)
    return seen[0]


def test_a_submit_over_the_tenants_quota_is_429_and_enqueues_nothing(port: int, tenant_farm: tuple[Farm, str]) -> None:
    farm, _ = tenant_farm
    lists = priority_lists(tenant_queue(model_queue("render", UNSERVED), "team-a")).values()

    def state() -> tuple[int, int]:
        return sum(int(farm.redis.llen(name)) for name in lists), int(farm.redis.zcard(job_index_key("team-a")))

    submitted = []
    for seed in (1, 2):
        status, _, job = call(
            port, "POST", "/v1/jobs?queue_anyway=true", spec(model=UNSERVED, seed=seed), key("team-a-ci")
        )
        assert (status, job["status"], job["model"]) == (201, "queued", UNSERVED), job
        submitted.append(job["id"])
    try:
        before = state()
        assert before[0] == 2
        status, headers, answer = call(
            port, "POST", "/v1/jobs?queue_anyway=true", spec(model=UNSERVED, seed=3), key("team-a-ci")
        )
        assert (status, answer["error"]["code"], headers["retry-after"]) == (429, "quota_exceeded", "30"), answer
        assert answer["error"]["message"] == (
            "tenant 'team-a' is over its queued quota: 2 queued + 1 submitted > max_queued=2 (RENDER_TENANTS); "
            "nothing was enqueued; retry in 30 s or submit fewer"
        )
        status, headers, answer = call(
            port, "POST", "/v1/batches?name=over&queue_anyway=true", [spec(model=UNSERVED, seed=4)], key("team-a-ci")
        )
        assert (status, answer["error"]["code"], headers["retry-after"]) == (429, "quota_exceeded", "30"), answer
        assert state() == before, "a refused submit enqueued or indexed a job"
        # team-b has no quota, and team-a's queued jobs are none of its count.
        status, _, other = call(port, "POST", "/v1/jobs?queue_anyway=true", spec(model=UNSERVED), key("team-b-ci"))
        assert (status, other["tenant"]) == (201, "team-b"), other
        submitted.append(other["id"])
    finally:
        farm.client.revoke_many(submitted)  # the operator's client: takes them off their queues


def test_a_key_of_an_undeclared_tenant_is_403_and_enqueues_nothing(port: int, tenant_farm: tuple[Farm, str]) -> None:
    farm, _ = tenant_farm
    status, _, answer = call(port, "POST", "/v1/jobs", QUICK, key("stranger"))
    assert (status, answer["error"]["code"]) == (403, "unknown_tenant"), answer
    assert answer["error"]["message"] == (
        "tenant 'team-z' (the API key's tenant in RENDER_API_KEYS) is not declared by this farm; its workers declare "
        "default, team-a, team-b: add it to RENDER_TENANTS on the workers, or give the key one of those"
    )
    status, _, answer = call(port, "POST", "/v1/batches?name=b", [QUICK], key("stranger"))
    assert (status, answer["error"]["code"]) == (403, "unknown_tenant"), answer
    assert farm.redis.zcard(job_index_key("team-z")) == 0
    assert listed(port, "stranger") == []


def test_a_keys_tenant_is_checked_and_api_key_prints_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_API_KEYS", json.dumps({"ci": {"hash": "$argon2id$x", "tenant": "Team A"}}))
    with pytest.raises(ConfigError, match=r"RENDER_API_KEYS \(ci\.tenant\): 'Team A' is not a tenant name; use 1-40"):
        load(ServiceSettings)
    made = render_here("api-key", "ci", "--tenant", "team-a")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.splitlines()[0].rsplit(" ", 1)[1]
    entry = json.loads(made.stdout.splitlines()[1].split(": ", 1)[1])
    assert (entry["ci"]["scope"], entry["ci"]["tenant"]) == ("full", "team-a")
    keys = Keys(ServiceSettings(api_keys=entry).api_keys)
    assert keys.tenant(keys.check(f"Bearer {secret}", write=True)) == "team-a"
    refused = render_here("api-key", "ci", "--tenant", "Team A")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --tenant: 'Team A' is not a tenant name")
