"""The web console in a real browser: Debian's Chromium driven by Playwright against `render serve`, a real
worker rendering tiny models and a private redis-server. The tests read the DOM the console's script builds
from the API and its SSE streams, and fail on any error the page logs.

`RENDER_CONSOLE_SCREENSHOTS=docs/images` makes the run write the screenshots of docs/console.md there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.browser import ensure_chromium
from tests.helpers import free_port, render_serve
from tests.integration.conftest import Farm, spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

sync_api = pytest.importorskip("playwright.sync_api")

WAIT_MS = 90_000  # DOM conditions: generous, the machine's two cores are shared with other tests' workers
# Long enough to watch: about 20 s of denoising on two shared cores, a stored frame every 3 steps.
WATCHED = spec(
    num_inference_steps=150,
    width=256,
    height=256,
    prompt="a lighthouse at dusk, watched",
    callbacks=[{"type": "frames", "every": 3, "format": "png", "size": 128}],
)
QUICK = spec(num_inference_steps=6, callbacks=[{"type": "frames", "every": 2, "format": "png", "size": 64}])
SHOTS = os.environ.get("RENDER_CONSOLE_SCREENSHOTS")


@dataclass
class Console:
    """The farm, the URL of `render serve` in front of it, and what the open page logged as errors."""

    farm: Farm
    url: str
    storage: Path
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serve(farm: Farm, storage: Path, logs: Path, **settings: str) -> Iterator[str]:
    """`render serve` on a free loopback port with `settings` (`RENDER_<NAME>`), until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "RENDER_REDIS_URL": farm.redis_url,
        "RENDER_STORAGE_URL": storage.as_uri(),
        **{f"RENDER_{name.upper()}": value for name, value in settings.items()},
    }
    command = [sys.executable, "-m", "worker.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with render_serve(command, env, logs / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def console(farm_factory: Callable[[], Farm], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    farm = farm_factory()
    storage = tmp_path_factory.mktemp("console-storage")
    farm.start_workers("painter", storage_url=storage.as_uri())
    with serve(farm, storage, farm.logs) as url:
        yield Console(farm, url, storage)


KEY = "rk_console-test-key"  # the key the console's prompt is given
READ_KEY = "rk_console-read-key"  # the key a tab holds before the console's script runs


@pytest.fixture(scope="module")
def keyed(console: Console, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second `render serve` on the same farm that asks for an API key: read-scoped KEY and READ_KEY."""
    hasher = PasswordHasher()
    keys = {
        "console": {"hash": hasher.hash(KEY), "scope": "read"},  # reading is all the lists need
        "watcher": {"hash": hasher.hash(READ_KEY), "scope": "read"},
    }
    with serve(console.farm, console.storage, tmp_path_factory.mktemp("keyed"), api_keys=json.dumps(keys)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=ensure_chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Any]:
    """A fresh page whose console errors and uncaught exceptions land in `console.errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme="light")
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    console.errors.clear()

    def logged(message: Any) -> None:
        if message.type == "error":
            console.errors.append(message.text)

    opened.on("console", logged)
    opened.on("pageerror", lambda exc: console.errors.append(f"uncaught: {exc}"))
    yield opened
    context.close()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"console-{name}.png"), full_page=True)


def text_of(page: Any, selector: str) -> str:
    return str(page.locator(selector).first.text_content() or "")


def step_of(page: Any, selector: str) -> int:
    """The step a "12 / 150" text shows (0 when none yet)."""
    shown = text_of(page, selector).split("/")[0].strip()
    return int(shown) if shown.isdigit() else 0


def src_of(page: Any, selector: str) -> str:
    return str(page.locator(selector).get_attribute("src") or "")


# What a screen reader needs of the page: every image has alt text, every control and link a name.
UNNAMED = """() => {
  const bad = [];
  for (const img of document.querySelectorAll("img")) if (!img.hasAttribute("alt")) bad.push("img " + img.src);
  for (const el of document.querySelectorAll("input, select, progress, button")) {
    if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.textContent.trim()) {
      bad.push(el.outerHTML.slice(0, 80));
    }
  }
  for (const a of document.querySelectorAll("a")) {
    if (!a.textContent.trim() && !a.querySelector("img[alt]:not([alt=''])")) bad.push("link " + a.href);
  }
  return bad;
}"""


def clean(console: Console, page: Any) -> None:
    """The page logged no error, and every image, control and link in it has a name."""
    assert console.errors == [], f"the page logged errors: {console.errors}"
    assert page.evaluate(UNNAMED) == [], "unnamed elements"


def test_a_batch_gallery_shows_its_images(console: Console, page: Any) -> None:
    batch = console.farm.client.submit_batch([QUICK | {"seed": n} for n in range(3)], name="console-gallery")
    page.goto(console.url + "/#/batches/console-gallery")
    page.wait_for_function(
        "() => document.querySelectorAll('#batch-gallery figure[data-status=\"succeeded\"]').length === 3"
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('#batch-gallery img')].filter(i => i.complete && i.naturalWidth).length"
        " === 3"
    )
    # The counts come from the batch's own poll, which may land a moment after the gallery's.
    page.wait_for_function("() => document.querySelector('#batch-counts').textContent.includes('3 succeeded')")
    assert page.locator("#cancel-batch").is_hidden(), "a finished batch offers no cancel"
    shot(page, "batch")

    # A job of the gallery opens on its page with its image, its frames and its manifest.
    page.click(f"#batch-gallery figure[data-job-id='{batch.task_ids[0]}'] a")
    page.wait_for_selector('#job-status .status[data-status="succeeded"]')
    page.wait_for_function("() => document.querySelectorAll('#job-images img').length === 1")
    page.wait_for_function("() => document.querySelectorAll('#job-frames img').length === 3")
    assert '"succeeded"' in text_of(page, "#job-manifest")
    # The jobs list links the batch.
    page.goto(console.url + "/#/")
    page.wait_for_selector("ul.batches a[href='#/batches/console-gallery']")
    page.wait_for_function("() => /3 succeeded/.test(document.querySelector('ul.batches .counts').textContent)")
    # A short page offers the older jobs (the list's next_cursor).
    page.goto(console.url + "/#/?limit=2")
    page.wait_for_selector("#more-jobs:not([hidden])")
    assert page.locator("table.jobs tbody tr").count() == 2
    page.get_by_role("button", name="Show older jobs").click()
    page.wait_for_function("() => document.querySelectorAll('table.jobs tbody tr').length === 3")
    page.wait_for_selector("#more-jobs[hidden]", state="attached")
    clean(console, page)


def test_the_job_page_follows_a_job_live_and_cancels_it(console: Console, page: Any) -> None:
    job = console.farm.client.submit(WATCHED, priority="high")
    page.goto(console.url + "/")
    row = f'tr[data-job-id="{job.task_id}"]'
    page.wait_for_selector(row)
    # The list follows a running job from its stream: its step text moves without a reload.
    page.wait_for_function(
        "sel => /^\\s*[1-9]\\d* \\/ 150/.test(document.querySelector(sel + ' .steps').textContent)", arg=row
    )
    page.wait_for_function("sel => document.querySelector(sel + ' img.thumb').naturalWidth > 0", arg=row)
    shot(page, "jobs")

    page.click(f"{row} a[href='#/jobs/{job.task_id}']")
    page.wait_for_selector("#job-status .status")
    page.wait_for_function("() => /^\\s*\\d+ \\/ 150/.test(document.querySelector('#job-step').textContent)")
    first_step = step_of(page, "#job-step")
    page.wait_for_function("() => !document.querySelector('#job-preview').hidden")
    first_preview = src_of(page, "#job-preview")
    # Without any reload: the step advances and the newest frame replaces the preview.
    page.wait_for_function("first => parseInt(document.querySelector('#job-step').textContent) > first", arg=first_step)
    page.wait_for_function(
        "first => document.querySelector('#job-preview').getAttribute('src') !== first", arg=first_preview
    )
    assert "/frames/" in src_of(page, "#job-preview")
    page.wait_for_function("() => document.querySelector('#job-preview').naturalWidth > 0")  # a frame loads
    assert page.evaluate("() => document.querySelector('#job-progress').value") >= first_step
    # The strip keeps the frames the stream showed (the API names only the newest while the job runs).
    page.wait_for_function("() => document.querySelectorAll('#job-frames img').length >= 2")
    shot(page, "job")

    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_selector('#job-status .status[data-status="revoked"]')
    assert console.farm.client.status(job.task_id).state == "revoked"
    page.wait_for_selector("#cancel-job", state="hidden")
    page.wait_for_function("() => document.querySelector('#job-manifest').textContent.includes('\"revoked\"')")
    clean(console, page)


def test_a_batch_is_cancelled_from_its_page(console: Console, page: Any) -> None:
    batch = console.farm.client.submit_batch([WATCHED | {"seed": n} for n in range(2)], name="console-cancelled")
    page.goto(console.url + "/#/batches/console-cancelled")
    page.get_by_role("button", name="Cancel batch").click()
    page.wait_for_function("() => /2 revoked/.test(document.querySelector('#batch-counts').textContent)")
    page.wait_for_selector("#cancel-batch", state="hidden")
    assert [s.state for s in console.farm.client.statuses(batch.task_ids)] == ["revoked", "revoked"]
    clean(console, page)


def test_the_fleet_panel_lists_the_worker_and_its_model(console: Console, page: Any) -> None:
    page.goto(console.url + "/#/fleet")
    page.wait_for_selector('tr[data-model="tiny-sd15"]')
    hostname = console.farm.workers[0].hostname
    assert hostname in text_of(page, 'tr[data-model="tiny-sd15"]')
    page.wait_for_selector(f'article.worker[data-worker="{hostname}"]')
    assert page.locator("a[data-nav='fleet']").get_attribute("aria-current") == "page"
    shot(page, "fleet")
    clean(console, page)


def test_a_two_stage_job_s_frames_are_named_by_stage(console: Console, page: Any) -> None:
    hires = spec(
        num_inference_steps=2,
        hires={"scale": 1.5, "strength": 0.5, "steps": 2},
        callbacks=[{"type": "frames", "every": 1, "format": "png", "size": 64}],
    )
    handle = console.farm.client.submit(hires)
    page.goto(console.url + f"/#/jobs/{handle.task_id}")
    page.wait_for_selector('#job-status .status[data-status="succeeded"]')
    page.wait_for_function("() => document.querySelectorAll('#job-frames figcaption').length === 3")
    captions = [str(c) for c in page.locator("#job-frames figcaption").all_text_contents()]
    assert captions == ["Step 1", "Step 2", "Hires step 1"], captions
    clean(console, page)


def test_an_unknown_job_says_so(console: Console, page: Any) -> None:
    page.goto(console.url + "/#/jobs/no-such-job")
    page.wait_for_selector("text=No such job")
    # Chromium logs the API's 404 as a failed request; the script itself logs nothing.
    assert all("404" in line for line in console.errors), console.errors


def test_a_farm_with_keys_asks_for_one_and_keeps_it_in_the_tab(console: Console, page: Any, keyed: str) -> None:
    page.goto(keyed + "/")
    page.wait_for_selector("#key-dialog[open]")
    assert "asks for an API key" in text_of(page, "#key-reason")
    page.fill("#key-input", "rk_wrong")
    page.get_by_role("button", name="Use key").click()
    page.wait_for_function("() => /not accepted/.test(document.querySelector('#key-reason').textContent)")
    assert page.locator("#key-dialog").get_attribute("open") is not None
    page.fill("#key-input", KEY)
    page.get_by_role("button", name="Use key").click()
    page.wait_for_selector("#key-dialog:not([open])", state="attached")
    page.wait_for_selector("table.jobs tbody tr[data-job-id]")
    assert page.evaluate("() => sessionStorage.getItem('render.apiKey')") == KEY
    assert page.locator("#forget-key").is_visible()
    # Chromium logs each refused request (401) as a failed resource; the script itself logs nothing.
    assert all("401" in line for line in console.errors), console.errors


def test_with_a_read_key_the_event_stream_and_the_served_files_work(console: Console, page: Any, keyed: str) -> None:
    job = console.farm.client.submit(QUICK | {"seed": 7, "num_inference_steps": 40})
    # The key in the tab before the console's script runs, as after the prompt: no request goes without it.
    page.add_init_script(f"sessionStorage.setItem('render.apiKey', {json.dumps(READ_KEY)})")
    page.goto(f"{keyed}/#/jobs/{job.task_id}")
    page.wait_for_selector('#job-status .status[data-status="succeeded"]')
    loaded = "() => [...document.querySelectorAll('#job-images img, #job-frames img')].filter(i => i.naturalWidth)"
    page.wait_for_function(loaded + ".length === 21", timeout=30_000)  # its image and 20 frames
    clean(console, page)
