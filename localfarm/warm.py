"""Warm starts: `render worker` processes forked from a server process that has already imported torch, diffusers,
transformers and Celery, instead of a new interpreter that spends seconds importing them each time.

Python's `forkserver` start method does the forking: the server imports `PRELOAD` once, then forks one child per
worker. A child is a real, separate worker process: it makes its own session (its own process group, so a signal
to the group reaches it and nothing else), writes its output to its log, sets its environment, and runs the
`render worker` command's own entry point, which parses its settings, runs its start-up checks and serves as a
worker started from a shell does. What it skips is the interpreter's start and the imports. The test farms use it
(each test file starts its own workers, dozens per run); the demo, the benchmarks and production start workers as
new interpreters.

`WarmProcess` answers as much of `subprocess.Popen` as the farms use: `pid`, `poll`, `wait`, `returncode`,
`send_signal`, `terminate`, `kill`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

PRELOAD = ["localfarm.warm_preload"]
"""What the fork server imports before it forks (a module that imports the heavy libraries, quietly)."""

_context: ForkServerContext | None = None
_alive: list[WarmProcess] = []


def _fork_server() -> ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
        atexit.register(_kill_left_running)  # before multiprocessing's own exit hook, which would wait for them
    return _context


def _kill_left_running() -> None:
    for process in _alive:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _run(argv: Sequence[str], env: Mapping[str, str], log: str) -> None:
    """In the forked child: a session of its own, output to `log`, the environment, then the command itself."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["render", *argv]
    # What `python -m worker.cli` runs, as it runs it (its imports are already loaded in this process).
    runpy.run_module("worker.cli", run_name="__main__", alter_sys=True)


class WarmProcess:
    """A warm-started worker process, with the part of `subprocess.Popen`'s interface the farms use."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.args = ["render", *argv]
        self._process = _fork_server().Process(target=_run, args=(list(argv), dict(env), str(log)), name="render")
        self._process.start()
        _alive.append(self)

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<WarmProcess pid={self._process.pid} exitcode={self._process.exitcode}>"


def warm_start(argv: Sequence[str], env: Mapping[str, str], log: Path) -> Any:
    """Start `render <argv>` warm with exactly `env`; its output appended to `log`."""
    return WarmProcess(argv, env, log)
