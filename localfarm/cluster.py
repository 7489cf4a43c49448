"""A private Redis server and `render worker` processes on this machine: for the demo, benchmarks and tests.

Everything binds to 127.0.0.1 on a free port and is torn down by its context manager.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from producer.celery_config import sentinel_of
from producer.errors import ConfigError
from producer.keys import worker_key
from producer.redis_connect import connect


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: Any = None,  # a subprocess.Popen, or anything with its `poll` and `returncode`
    log: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll `ready` until true; fail naming `what`, with the end of its log, if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready{_tail(log)}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join(text) if text else f"; {log} is empty"


def stop_process(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM `process` and wait up to `timeout` seconds for it, then SIGKILL it; nothing if it already exited."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """`redis-server` on a free loopback port, data in a temporary directory, no persistence by default."""

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "redis-server is not installed; install it (apt-get install redis-server) or set "
                "RENDER_REDIS_URL to a running Redis"
            )
        self.binary = binary
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="render-redis-"))
        self.appendonly = appendonly
        self.password = password
        self.extra_args = list(extra_args)  # e.g. --replicaof HOST PORT
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = self.workdir / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",  # an acknowledged write survives a crash: what the restart tests rely on
                "--databases",
                "64",  # tests give each farm a database of its own
                "--logfile",
                str(log),
                *(["--requirepass", self.password] if self.password else []),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=20, what=f"redis-server on port {self.port}", process=self.process, log=log)
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """One `render worker` process (its Celery consumer, job threads and GPU thread) in its own process group."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, warm: bool = False) -> None:
        self.name = name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.warm = warm  # forked from a process that has imported the libraries already (`localfarm.warm`)
        self.process: Any = None  # a subprocess.Popen, or a `localfarm.warm.WarmProcess` with its interface
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        argv = ["worker", "--hostname", self.hostname, "--loglevel", "INFO"]
        if self.warm:
            from localfarm.warm import warm_start

            self.process = warm_start(argv, self.env, self.log_path)
            return self
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        return self

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        """Wait until the worker answers a Celery ping (it consumes) and advertises itself (its models are served)."""
        advert = connect(app.conf.broker_url, socket_timeout=5, **sentinel_of(app.conf.broker_transport_options))

        def ready() -> bool:
            pinged = bool(app.control.ping(destination=[self.hostname], timeout=0.5))
            return pinged and bool(advert.exists(worker_key(self.hostname)))

        try:
            wait_until(ready, timeout=timeout, what=f"worker {self.hostname}", process=self.process, log=self.log_path)
        finally:
            advert.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        pid: int = self.process.pid
        return pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group: the main process and the child rendering."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:  # a warm start not yet in its own session: the process alone
                self.process.send_signal(sig)

    def stop(self, timeout: float = 15, *, signalled: bool = False) -> None:
        """SIGTERM (unless `signalled` already), wait up to `timeout` s for the warm shutdown, then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            if not signalled:
                self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()

    @staticmethod
    def stop_all(workers: list[WorkerProcess], timeout: float = 15) -> None:
        """Stop several workers at once: all are told to shut down, then each is waited for."""
        for worker in workers:
            worker.kill(signal.SIGTERM)
        for worker in workers:
            worker.stop(timeout, signalled=True)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
