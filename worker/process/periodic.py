"""A daemon thread of the worker's main process that does one thing every few seconds."""

from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger(__name__)


class PeriodicThread:
    """Calls `tick()` every `interval` seconds from a daemon thread until `stop()`; a failing tick is logged, never
    fatal (Redis away for a while is normal life for these)."""

    thread_name = "render-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("%s: %s; retrying in %.1f s", self.thread_name, exc, self.interval)
            except Exception:
                log.exception("%s failed; retrying in %.1f s", self.thread_name, self.interval)
