"""The HTTP job API (`render serve`) on a real uvicorn server, over a real Redis and a real worker.

Each server is `uvicorn.Server` in a thread of this process (the app as `render serve` builds it); requests go
over TCP with http.client, so headers, status codes, streaming and the body cap are what a client meets.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from localfarm.cluster import RedisServer
from producer.errors import SpecError
from producer.spec import RenderSpec
from service.app import create_app
from service.auth import hash_key
from service.settings import ApiKey, ServiceSettings
from tests.helpers import free_port, render_here, wait_until
from tests.integration.conftest import LONG, Farm, spec

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).parents[2]


@contextmanager
def serving(settings: ServiceSettings) -> Iterator[int]:
    """The app on a free loopback port, in a thread; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30, what=f"the service on port {port}")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request; the status, headers (lower-cased names) and the JSON body (or the raw bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    parsed = json.loads(raw) if found.get("content-type", "").startswith("application/json") else raw
    return response.status, found, parsed


def events(port: int, task_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every SSE event of the job's stream until the server ends it: {"event", "id", "data"} each."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", f"/v1/jobs/{task_id}/events", headers=headers or {})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for raw in response:  # line by line, as the server flushes them
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in current:
                found.append(current)
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    connection.close()
    return found


def poll(port: int, task_id: str, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        seen[:] = [call(port, "GET", f"/v1/jobs/{task_id}")[2]]
        return done(seen[0])

    wait_until(reached, timeout=120, what=what, interval=0.05)
    return seen[0]


@pytest.fixture(scope="module")
def api_farm(farm_factory: Callable[[], Farm], tmp_path_factory: pytest.TempPathFactory) -> tuple[Farm, str]:
    """One worker writing to a file:// storage the service serves from."""
    made = farm_factory()
    storage = tmp_path_factory.mktemp("storage").as_uri()
    made.start_workers("alpha", storage_url=storage)
    return made, storage


@pytest.fixture(scope="module")
def settings(api_farm: tuple[Farm, str]) -> ServiceSettings:
    farm, storage = api_farm
    return ServiceSettings(redis_url=farm.redis_url, storage_url=storage)


@pytest.fixture(scope="module")
def port(settings: ServiceSettings) -> Iterator[int]:
    with serving(settings) as found:
        yield found


def test_health_and_the_checked_in_openapi_document(port: int) -> None:
    assert call(port, "GET", "/healthz")[:3:2] == (200, {"status": "ok"})
    assert call(port, "GET", "/readyz")[0] == 200
    status, _, served = call(port, "GET", "/openapi.json")
    assert status == 200
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, "docs/openapi.json is out of date; run `make docs`"


def test_submit_with_idempotency_key_replays_the_same_job(port: int, api_farm: tuple[Farm, str]) -> None:
    farm, _ = api_farm
    key = {"Idempotency-Key": "order-1234"}
    status, headers, job = call(port, "POST", "/v1/jobs", spec(seed=7), key)
    assert status == 201, job
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "events": f"/v1/jobs/{job['id']}/events",
        "cancel": f"/v1/jobs/{job['id']}/cancel",
        "files": f"/v1/jobs/{job['id']}/files",
    }
    assert headers["location"] == job["links"]["self"]
    submitted, _ = farm.client.jobs(limit=1000)
    again_status, _, again = call(port, "POST", "/v1/jobs", spec(seed=7), key)
    assert (again_status, again["id"]) == (200, job["id"])
    assert len(farm.client.jobs(limit=1000)[0]) == len(submitted), "a replay enqueued a job"
    conflict_status, _, conflict = call(port, "POST", "/v1/jobs", spec(seed=8), key)
    assert conflict_status == 422
    assert conflict["error"]["code"] == "idempotency_conflict"
    assert conflict["error"]["field"] == "Idempotency-Key"
    final = poll(port, job["id"], lambda j: j["status"] == "succeeded", "the job to succeed")
    assert final["manifest"]["status"] == "succeeded"


def test_events_stream_rising_steps_and_the_files_are_served(port: int) -> None:
    body = {**LONG, "callbacks": [{"type": "frames", "every": 30, "size": 64}]}  # long enough to be seen rendering
    status, _, job = call(port, "POST", "/v1/jobs", body)
    assert status == 201, job
    stream = events(port, job["id"])
    assert {event["event"] for event in stream} == {"snapshot"}
    assert stream[-1]["data"]["status"] == "succeeded"
    ids = [int(event["id"]) for event in stream]
    assert ids == sorted(ids)
    steps = [event["data"]["step"] for event in stream if event["data"]["status"] == "progress"]
    assert steps == sorted(steps) and len(set(steps)) >= 2, f"no rising steps: {[e['data'] for e in stream]}"
    final = stream[-1]["data"]
    images = [item["url"] for item in final["files"] if item["kind"] == "image"]
    assert images and all(url.startswith("/v1/files/") for url in images)
    status, headers, data = call(port, "GET", images[0])
    assert (status, headers["content-type"]) == (200, "image/png")
    assert data.startswith(b"\x89PNG")
    assert call(port, "GET", "/v1/files/../../etc/passwd")[0] == 404
    # Reconnecting with the final event's id: the client has seen everything, the stream ends at once.
    assert events(port, job["id"], {"Last-Event-ID": stream[-1]["id"]}) == []
    listed = call(port, "GET", f"/v1/jobs/{job['id']}/files")[2]["files"]
    assert [item["url"] for item in listed] == [item["url"] for item in final["files"]]


def test_cancel_a_long_job_ends_it_revoked(port: int) -> None:
    status, _, job = call(port, "POST", "/v1/jobs", LONG)
    assert status == 201, job
    poll(port, job["id"], lambda j: j["status"] == "progress", "the long job to render")
    status, _, cancelled = call(port, "POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 200 and cancelled["id"] == job["id"]
    final = poll(port, job["id"], lambda j: j["status"] == "revoked", "the job to end revoked")
    assert final["manifest"]["steps_completed"] < LONG["num_inference_steps"]
    assert final["files"] == [] or all(item["kind"] == "frame" for item in final["files"])
    again = call(port, "POST", f"/v1/jobs/{job['id']}/cancel")
    assert (again[0], again[2]["status"]) == (200, "revoked")
    assert call(port, "POST", "/v1/jobs/no-such-job/cancel")[2]["error"]["code"] == "not_found"


def test_a_bad_spec_is_422_with_the_clis_field_and_message(port: int, tmp_path: Path) -> None:
    bad = spec(num_inference_steps=500)
    status, _, answer = call(port, "POST", "/v1/jobs", bad)
    assert status == 422
    with pytest.raises(SpecError) as raised:
        RenderSpec.parse(json.dumps(bad))
    assert answer["error"] == {"code": "invalid_spec", "message": str(raised.value), "field": "num_inference_steps"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert render_here("submit", str(path)).stderr == f"error: {answer['error']['message']}\n"
    status, _, answer = call(port, "POST", "/v1/batches?name=bad-lines", [spec(), spec(width=13)])
    assert status == 422
    assert answer["error"]["code"] == "invalid_spec"
    assert answer["error"]["lines"][0]["line"] == 2
    assert answer["error"]["lines"][0]["field"] == "width"


def test_a_batch_over_http(port: int) -> None:
    lines = "\n".join(json.dumps(spec(seed=seed)) for seed in (1, 2)).encode()
    status, _, batch = call(
        port, "POST", "/v1/batches?name=http-batch", lines, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 201, batch
    assert (batch["total"], batch["submitted"]) == (2, {"new": 2})

    def finished() -> bool:
        return call(port, "GET", "/v1/batches/http-batch")[2]["counts"] == {"succeeded": 2}

    wait_until(finished, timeout=120, what="the batch to finish")
    listed = call(port, "GET", "/v1/jobs?batch=http-batch")[2]
    assert {job["batch"] for job in listed["jobs"]} == {"http-batch"}
    assert call(port, "GET", "/v1/batches/no-such-batch")[0] == 404


def test_keys_401_without_and_403_for_a_read_key_on_a_write(settings: ServiceSettings) -> None:
    keys = {
        "ci": ApiKey(hash=hash_key("full-key"), scope="full"),
        "dash": ApiKey(hash=hash_key("read-key"), scope="read"),
    }
    with serving(settings.model_copy(update={"api_keys": keys})) as port:
        status, headers, answer = call(port, "GET", "/v1/jobs/some-job")
        assert (status, answer["error"]["code"], headers["www-authenticate"]) == (401, "unauthorized", "Bearer")
        assert call(port, "GET", "/v1/jobs/some-job", headers={"Authorization": "Bearer wrong"})[0] == 401
        read = {"Authorization": "Bearer read-key"}
        assert call(port, "GET", "/v1/jobs/some-job", headers=read)[0] == 404  # let in: the job is unknown
        status, _, answer = call(port, "POST", "/v1/jobs", spec(), read)
        assert (status, answer["error"]["code"]) == (403, "forbidden")
        status, _, job = call(port, "POST", "/v1/jobs", spec(), {"Authorization": "Bearer full-key"})
        assert status == 201, job
        assert call(port, "GET", "/healthz")[0] == 200  # probes and the console's files ask for no key


def test_a_full_queue_is_429_with_retry_after(settings: ServiceSettings) -> None:
    limited = settings.model_copy(update={"max_queued": 1})
    with serving(limited) as port:
        # No worker serves this model, so its jobs stay queued.
        first = call(port, "POST", "/v1/jobs?queue_anyway=true", spec(model="unserved-model"))
        assert first[0] == 201, first
        status, headers, answer = call(port, "POST", "/v1/jobs?queue_anyway=true", spec(model="unserved-model", seed=2))
        assert (status, answer["error"]["code"]) == (429, "queue_full")
        assert int(headers["retry-after"]) >= 1
        status, _, answer = call(port, "POST", "/v1/jobs", spec(model="unserved-model", seed=3))
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (409, "no_worker_for_model", "model")


def test_the_body_cap_is_413(settings: ServiceSettings) -> None:
    with serving(settings.model_copy(update={"api_max_body_bytes": 1024})) as port:
        status, _, answer = call(port, "POST", "/v1/jobs", spec(prompt="x" * 4000))
        assert (status, answer["error"]["code"]) == (413, "payload_too_large")


def test_readyz_is_503_while_redis_is_down(settings: ServiceSettings, tmp_path: Path) -> None:
    redis_server = RedisServer(workdir=tmp_path).start()
    try:
        with serving(settings.model_copy(update={"redis_url": redis_server.url})) as port:
            assert call(port, "GET", "/readyz")[0] == 200
            redis_server.stop()
            status, _, answer = call(port, "GET", "/readyz")
            assert (status, answer["error"]["code"]) == (503, "unavailable")
            assert "redis" in answer["error"]["message"]
            status, _, answer = call(port, "GET", "/v1/jobs/some-job")
            assert (status, answer["error"]["code"]) == (503, "unavailable")
            assert call(port, "GET", "/healthz")[0] == 200
    finally:
        redis_server.stop()


def test_serve_refuses_a_public_host_without_keys_and_api_key_makes_one() -> None:
    refused = render_here("serve", "--host", "0.0.0.0", env={"RENDER_API_KEYS": "{}"})
    assert refused.returncode == 2
    assert "loopback only" in refused.stderr and "RENDER_API_KEYS" in refused.stderr
    made = render_here("api-key", "ci", "--scope", "read")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[0].rsplit(" ", 1)[1]
    entry = json.loads(made.stdout.splitlines()[1].split(": ", 1)[1])
    assert entry["ci"]["scope"] == "read"
    settings = ServiceSettings(api_keys=entry)
    from service.auth import Keys

    assert Keys(settings.api_keys).check(f"Bearer {key}", write=False) == "ci"


def test_prefer_wait_answers_the_final_job(port: int) -> None:
    status, headers, job = call(port, "POST", "/v1/jobs", spec(seed=11), {"Prefer": "wait=60"})
    assert (status, job["status"], headers["preference-applied"]) == (201, "succeeded", "wait=60")
    assert job["manifest"]["steps_completed"] == 10


def test_s3_files_are_presigned_links(s3_server: str, s3_bucket: str) -> None:
    from service.files import link

    settings = ServiceSettings(
        storage_url=f"s3://{s3_bucket}/renders", s3_endpoint_url=s3_server, signed_url_seconds=60
    )
    parts = create_app(settings).state.service
    url = link(parts, f"s3://{s3_bucket}/renders/job-1/image-0.png")
    assert url.startswith(f"{s3_server}/{s3_bucket}/renders/job-1/image-0.png?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    assert link(parts, "s3://elsewhere/x.png") == "s3://elsewhere/x.png"


def test_a_job_whose_deadline_passes_behind_a_long_one_ends_expired_without_rendering(port: int) -> None:
    status, _, long = call(port, "POST", "/v1/jobs", LONG)
    assert status == 201, long
    poll(port, long["id"], lambda j: j["status"] == "progress", "the long job to render")
    status, _, late = call(port, "POST", "/v1/jobs", spec(deadline_seconds=1, num_inference_steps=4))
    assert status == 201, late
    try:
        stream = events(port, late["id"])  # a stream of the waiting job: queued, then its final state
    finally:
        call(port, "POST", f"/v1/jobs/{long['id']}/cancel")
    final = stream[-1]["data"]
    assert final["status"] == "expired", final
    assert final["manifest"]["steps_completed"] == 0 and final["files"] == []
    assert "deadline of 1 s passed before a worker started it" in final["manifest"]["error"]
