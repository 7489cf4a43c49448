"""Which list a worker pops its next job from: its loaded model's, unless a job elsewhere waited too long.

A worker serving several models keeps one loaded (`RENDER_MAX_CACHED_MODELS`), and a job for another
model costs a load: seconds to tens of seconds for SDXL from disk. kombu polls all of a worker's
queues with one BRPOP over every (priority, queue) list, and Redis pops from the first non-empty list
named, so the order of the names is the worker's preference (`worker.process.transport` asks `Affinity`):

1. lists whose oldest job has waited longer than `RENDER_SWITCH_AFTER_SECONDS`, longest wait first:
   the bound on unfairness, across models and priorities alike (a low job behind a stream of normal
   ones, a model behind another's backlog);
2. then by priority, high, normal, low; within one, the queue the worker's last job came from (its
   loaded model), then the others in kombu's round robin.

Waits are read by `AffinityWatcher`, a thread of the worker's main process, every few seconds: one
Redis call (a script reading the `render_submitted_at` header of each list's oldest message on the
server, so no message body crosses the network).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from producer.keys import unscoped
from worker.process.periodic import PeriodicThread

# For each list: the submit time in the header of its oldest message (the tail; LPUSH adds at the head), or "".
_OLDEST_SUBMITTED = """
local out = {}
for i, key in ipairs(KEYS) do
  local message = redis.call('LINDEX', key, -1)
  local at = message and string.match(message, '"render_submitted_at": *([0-9.eE+-]+)')
  out[i] = at or ''
end
return out
"""


class Affinity:
    """The preference of one worker's consumer; read by its transport before each poll."""

    def __init__(self, model_queues: Sequence[str]) -> None:
        self.model_queues = frozenset(model_queues)
        self.loaded_queue: str | None = None  # the queue of the last job taken: its model is loaded now
        self.starved: tuple[str, ...] = ()  # lists whose oldest job waited too long, longest first

    def delivered(self, queue: str) -> None:
        """A job came from `queue`; the worker is about to load (or keep) that queue's model."""
        if queue in self.model_queues:
            self.loaded_queue = queue

    def order(self, lists: Sequence[tuple[int, str, str]]) -> list[str]:
        """List names to BRPOP, preferred first, from kombu's `(priority step, queue, list name)` in its own order."""
        starved = {name: rank for rank, name in enumerate(self.starved)}

        def rank(item: tuple[int, tuple[int, str, str]]) -> tuple[int, int, int, int]:
            position, (step, queue, name) = item
            if name in starved:
                return (0, starved[name], 0, position)
            return (1, step, 0 if queue == self.loaded_queue else 1, position)

        return [name for _, (_, _, name) in sorted(enumerate(lists), key=rank)]


class AffinityWatcher(PeriodicThread):
    """Every `interval` seconds, marks the lists whose oldest job has waited longer than `switch_after`."""

    thread_name = "render-affinity"

    def __init__(
        self,
        client: redis.Redis,
        affinity: Affinity,
        lists: Sequence[str],
        *,
        switch_after: float,
        interval: float | None = None,
    ) -> None:
        super().__init__(interval if interval is not None else max(0.25, min(switch_after / 4, 5.0)))
        self.client = client
        self.affinity = affinity
        self.lists = list(lists)
        self.switch_after = switch_after
        self._script = client.register_script(_OLDEST_SUBMITTED)

    def tick(self) -> tuple[str, ...]:
        return self.check()  # Redis away: the last preference stays until a check succeeds

    def check(self, now: float | None = None) -> tuple[str, ...]:
        """Read the oldest wait of every list and update the affinity's starved lists; return them."""
        now = time.time() if now is None else now
        submitted = self._script(keys=self.lists)
        waits = []
        for name, raw in zip(self.lists, submitted, strict=True):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            if text:
                waits.append((now - float(text), name))
        # A tenant's list (`team-a@render.m`) is polled through its queue's own list (worker.process.fairshare).
        starved = tuple(
            dict.fromkeys(unscoped(name) for wait, name in sorted(waits, reverse=True) if wait > self.switch_after)
        )
        self.affinity.starved = starved
        return starved
