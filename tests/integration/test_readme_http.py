"""README.md's "Any language: the HTTP API" section, run as written: its curl block with bash (and the README's
`$API`), its JavaScript client in Chromium (Node has `fetch` but no `EventSource`), against a real
`render serve`, a real worker rendering tiny-sd15 and a private redis-server. A README edit that breaks a
command breaks this test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser import ensure_chromium
from tests.helpers import ROOT, free_port
from tests.helpers import render_serve as serve_process
from tests.integration.conftest import LONG, Farm

pytestmark = [pytest.mark.integration]

SECTION = "## Any language: the HTTP API"
README_API = "http://127.0.0.1:8080"
FINAL = {"succeeded", "interrupted", "revoked", "failed", "expired"}


def blocks(language: str) -> list[str]:
    """The fenced `language` blocks of the README's HTTP section, in order."""
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme, f"README.md lost its section {SECTION!r}"
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


@dataclass
class Api:
    farm: Farm
    url: str


@contextlib.contextmanager
def render_serve(farm: Farm, storage: Path, logs: Path) -> Iterator[str]:
    """`render serve --port P` as the README starts it (its RENDER_* settings: the farm's), until the block ends."""
    port = free_port()
    env = {**os.environ, "RENDER_REDIS_URL": farm.redis_url, "RENDER_STORAGE_URL": storage.as_uri()}
    env.pop("RENDER_API_KEYS", None)
    render = Path(sys.executable).with_name("render")
    with serve_process([str(render), "serve", "--port", str(port)], env, logs / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def api(farm_factory: Callable[[], Farm], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    (serve_block, _) = blocks("bash")
    # The test starts what the first block starts, on a free port, and gives the rest its address as $API.
    assert ".venv/bin/render serve --port 8080 &" in serve_block and f"export API={README_API}" in serve_block
    farm = farm_factory()
    storage = tmp_path_factory.mktemp("readme-storage")
    farm.start_workers("readme", storage_url=storage.as_uri())
    with render_serve(farm, storage, farm.logs) as url:
        yield Api(farm, url)


def run_curl_block(block: str, url: str) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        env={**os.environ, "API": url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the README's curl block failed ({done.returncode}): {done.stderr}"
    return done.stdout


def parse(output: str) -> tuple[list[str], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The curl block's output: the event stream (event names, snapshots), then the job and the cancel answer."""
    stream, _, rest = output.rpartition("\n\n")
    lines = stream.splitlines()
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    snapshots = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    decoder = json.JSONDecoder()
    job, end = decoder.raw_decode(rest)
    cancelled, _ = decoder.raw_decode(rest, end)
    return names, snapshots, job, cancelled


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("jq") is None, reason="needs curl and jq")
def test_the_readme_s_curl_commands_submit_follow_and_cancel(api: Api) -> None:
    (_, block) = blocks("bash")
    names, snapshots, job, cancelled = parse(run_curl_block(block, api.url))
    # The stream: a snapshot on every change, of one job, its steps moving forward, the final state last.
    assert names and set(names) == {"snapshot"} and len(names) == len(snapshots)
    assert {s["id"] for s in snapshots} == {job["id"]}
    steps = [s["step"] for s in snapshots if s["step"] is not None]
    assert steps == sorted(steps) and snapshots[-1]["status"] == "succeeded"
    assert not [s for s in snapshots[:-1] if s["status"] in FINAL]
    assert job["status"] == "succeeded" and job["step"] == job["total"] == 30
    assert job["manifest"]["status"] == "succeeded" and [f["kind"] for f in job["files"]] == ["image"]
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events"
    # Cancelling a finished job answers it as it is.
    assert cancelled["id"] == job["id"] and cancelled["status"] == "succeeded"

    # Run again, as a client retrying: the Idempotency-Key answers the same job, and nothing new is enqueued.
    known = {s.task_id for s in api.farm.client.jobs(limit=1000)[0]}
    names, snapshots, again, _ = parse(run_curl_block(block, api.url))
    assert again["id"] == job["id"] and again["manifest"] == job["manifest"]
    assert [s["status"] for s in snapshots] == ["succeeded"], "a finished job's stream: its final snapshot only"
    assert {s.task_id for s in api.farm.client.jobs(limit=1000)[0]} == known


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=ensure_chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


def test_the_readme_s_javascript_client_follows_a_job_and_cancels_one_in_a_browser(api: Api, browser: Any) -> None:
    (client,) = blocks("js")
    assert client.count(f'const API = "{README_API}";') == 1
    code = client.replace(f'const API = "{README_API}";', f"const API = {json.dumps(api.url)};")
    # After the README's code (which submits, follows and logs a job), its functions cancel a long job mid-run.
    script = f"""async () => {{
{code}
const again = await submit(spec, "lighthouse-2");
const image = await fetch(done.files.find((file) => file.kind === "image").url);
const long = await submit({json.dumps(LONG)}, "readme-long");
let cancelled = null;
const stopped = await follow(long, (now) => {{ if (now.step >= 1 && !cancelled) cancelled = cancel(long); }});
return {{ done, again, image: [image.status, image.headers.get("content-type")], stopped, cancelled: await cancelled }};
}}"""
    page = browser.new_page()
    logged: list[str] = []
    errors: list[str] = []

    def seen(message: Any) -> None:
        if message.location.get("url", "").endswith("/favicon.ico"):
            return  # the browser asks for one on its own; the service has none
        (errors if message.type == "error" else logged).append(message.text)

    page.on("console", seen)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    try:
        page.goto(api.url + "/healthz")  # the service's own origin: it sends no CORS headers
        result = page.evaluate(script)
    finally:
        page.close()
    assert not errors, errors
    done, stopped = result["done"], result["stopped"]
    assert done["status"] == "succeeded" and done["step"] == 30 and result["again"]["id"] == done["id"]
    assert result["image"] == [200, "image/png"]
    # The README's onChange logged the snapshots as they came, the final one with its files after them.
    assert logged[-1].startswith("succeeded") and any(line.split()[0] not in FINAL for line in logged[:-1]), logged
    assert stopped["status"] == "revoked" and 1 <= stopped["step"] < 150, stopped
    assert result["cancelled"]["id"] == stopped["id"] and stopped["manifest"]["status"] == "revoked"
    assert stopped["files"] == [], "a cancelled job stops before the decode: no image"
