"""Fixtures for real services. S3 is moto's server mode in its own process, on a free port.

`s3_server` points boto3 at fake credentials for the whole session (AWS_ACCESS_KEY_ID=testing,
AWS_SECRET_ACCESS_KEY=testing-secret, AWS_DEFAULT_REGION=us-east-1) and hides any real AWS profile or
config file, so no test can reach real AWS with a developer's own credentials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from localfarm.cluster import stop_process
from tests.helpers import free_port, http_answers, wait_until

# Nothing in the test run may reach a model hub or real AWS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",  # distinctive, so tests can assert it never appears in a message
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET_AWS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API server (moto server mode) in a subprocess; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with pytest.MonkeyPatch.context() as env, log_path.open("wb") as log:
        for key, value in FAKE_AWS.items():
            env.setenv(key, value)
        for key in UNSET_AWS:
            env.delenv(key, raising=False)
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
        try:
            wait_until(
                lambda: http_answers(endpoint),
                timeout=30,
                what=f"moto S3 server at {endpoint}",
                process=process,
                log=log_path,
            )
            yield endpoint
        finally:
            stop_process(process, timeout=10)


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A new, empty, uniquely named bucket on the S3 test server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield name


def pytest_configure(config: pytest.Config) -> None:
    """Under `make test`'s two test processes (pytest-xdist), each of them and every process it starts takes one
    torch (OpenMP) thread: two processes with a thread per core each oversubscribe the cores, and OpenMP's spinning
    threads burn the CPU the other process and the workers it started need."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (see `_longest_first`); `gpu` tests run only where CUDA is present."""
    _longest_first(items)
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def _longest_first(items: list[pytest.Item]) -> None:
    """Files in the order their tests take longest: the fault suite, then the integration tests, then `slow` ones,
    then the rest; alphabetical within each. `make test` hands whole files to its two processes in this order
    (`--dist loadfile --no-loadscope-reorder`), so the last files to start are short and neither process idles
    long at the end. (xdist's own reorder, by number of tests, sent the few long fault tests last: a tail of one
    process working alone for minutes.)"""

    def rank(item: pytest.Item) -> int:
        for order, marker in enumerate(("faults", "integration", "slow")):
            if item.get_closest_marker(marker):
                return order
        return 3

    first: dict[str, tuple[int, int]] = {}
    for index, item in enumerate(items):
        path = str(item.path)
        order = rank(item)
        known = first.get(path)
        first[path] = (min(order, known[0]) if known else order, known[1] if known else index)
    items.sort(key=lambda item: first[str(item.path)])
