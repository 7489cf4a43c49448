"""A worker whose consumer hits an unrecoverable error exits non-zero, so its supervisor restarts it.

Celery logs "Unrecoverable error" and stops, but `app.worker_main` drops the exit status; `run_worker`
(what `render worker` calls) returns it. The failure here is a real consumer bootstep raising at start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localfarm.cluster import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCRIPT = textwrap.dedent(
    """
    import sys
    from celery import bootsteps
    from worker.celery_app import create_app, run_worker, worker_argv
    from worker.settings import WorkerSettings

    class Broken(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent):
            raise RuntimeError("a consumer step that cannot start")

    settings = WorkerSettings(redis_url=sys.argv[1], storage_url=sys.argv[2])
    app = create_app(settings)
    app.steps["consumer"].add(Broken)
    sys.exit(run_worker(app, worker_argv(settings, hostname="broken@test", loglevel="INFO")))
    """
)


def test_an_unrecoverable_consumer_error_exits_non_zero(redis_server: RedisServer, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_server.url.replace("/0", "/15"), tmp_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert "Unrecoverable error: RuntimeError('a consumer step that cannot start')" in done.stderr + done.stdout
    assert done.returncode == 1, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("setting", "value", "names"),
    [
        ("RENDER_MODELS", '{"real": {"family": "sd15", "source": "/nonexistent/models/sd15"}}', "RENDER_MODELS: "),
        ("RENDER_STORAGE_URL", "s3://no-such-bucket-here/renders", "RENDER_STORAGE_URL="),
        ("RENDER_WEBHOOK_HOSTS", "bad host!", "RENDER_WEBHOOK_HOSTS: "),
    ],
)
def test_a_worker_whose_settings_cannot_work_exits_2_with_one_line_and_takes_nothing(
    redis_server: RedisServer, s3_server: str, tmp_path: Path, setting: str, value: str, names: str
) -> None:
    """`render worker` checks every setting before it consumes: one line naming the setting, exit 2, no advert."""
    import redis

    from tests.helpers import render_here

    url = redis_server.url.replace("/0", "/14")
    connection = redis.Redis.from_url(url)
    connection.flushdb()
    env = {"RENDER_REDIS_URL": url, "RENDER_STORAGE_URL": tmp_path.as_uri(), "RENDER_S3_ENDPOINT_URL": s3_server}
    done = render_here("worker", "--hostname", "refused@test", env={**env, setting: value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {names}") or done.stderr.startswith(f"error: invalid setting: {names}")
    assert done.stderr.count("\n") == 1, done.stderr
    assert connection.dbsize() == 0, "the refused worker wrote to Redis (an advert, a queue, a heartbeat)"
    connection.close()


def test_a_worker_run_on_another_pool_than_threads_stops_at_start_naming_the_pool(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`celery -A worker.celery_app worker --pool=processes` (prefork): the services bootstep refuses it before any
    job (a forked child would share the parent's Redis sockets and GPU thread), and the worker exits non-zero."""
    env = {
        **os.environ,
        "RENDER_REDIS_URL": redis_server.url.replace("/0", "/14"),
        "RENDER_STORAGE_URL": tmp_path.as_uri(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=processes", "-c", "1"],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert "runs its jobs on threads (--pool=threads), not on TaskPool" in done.stderr + done.stdout, done.stderr[
        -2000:
    ]
    assert done.returncode != 0
