"""Jobs still waiting on their queue: find their messages on kombu's Redis lists by task id, and take them off.

kombu keeps a queue as one Redis list per priority step (`producer.keys.priority_lists`); a message is pushed on
the left and a worker pops it from the right, so the oldest wait at the right end. Two callers take waiting jobs
off: a revoke of many jobs (`RenderClient.revoke_many`) and the workers' recovery scan, which expires jobs whose
deadline passed while they waited (`worker.process.expiry`). Both find the messages (`find`), then remove each one
by its exact text (`take_off`): a message a worker popped in between is not removed, and the caller leaves that job
to the worker that holds it.

Lists are read from the oldest end in chunks, and a list is read no further once every wanted job is found: jobs
past their deadline are usually the oldest, so a scan of a long backlog reads little of it. A worker popping while
the lists are read can make one read skip a few messages; they are the next to be taken anyway.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producer.keys import priority_lists
from producer.records import TaskMessage

CHUNK = 1000
"""Messages read per LRANGE."""


def message_id(raw: bytes | str) -> str | None:
    """The task id in a kombu message on a Redis list, or None if it holds none (or is not a message)."""
    try:
        task_id = json.loads(raw)["headers"]["id"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return task_id if isinstance(task_id, str) else None


@dataclass(frozen=True)
class Queued:
    """One waiting job's message: the list it waits on, its exact text there, and its task id."""

    list: str
    raw: bytes
    task_id: str

    def message(self) -> TaskMessage | None:
        """The job as a `TaskMessage` (its spec, queue, priority and headers), or None if the envelope is not a
        `render.run` message this producer wrote."""
        try:
            envelope = json.loads(self.raw)
            headers, properties = envelope["headers"], envelope["properties"]
            body: Any = envelope["body"]
            if properties.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            spec = args[0] if isinstance(args[0], str) else json.dumps(args[0])
            queue = properties["delivery_info"]["routing_key"]
            return TaskMessage.with_headers(self.task_id, spec, queue, properties.get("priority"), headers)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return None


def find(client: redis.Redis, queues: Iterable[str], wanted: set[str]) -> list[Queued]:
    """The messages of `wanted` on the priority lists of `queues` (full queue names, a tenant's included), oldest
    first within each list; reading stops once each wanted job is found."""
    found: list[Queued] = []
    missing = set(wanted)
    for queue in sorted(set(queues)):
        for name in priority_lists(queue).values():
            end = -1
            while missing:
                raws: list[bytes] = client.lrange(name, end - CHUNK + 1, end)  # type: ignore[assignment]
                for raw in reversed(raws):
                    task_id = message_id(raw)
                    if task_id is not None and task_id in wanted:
                        found.append(Queued(name, raw, task_id))
                        missing.discard(task_id)
                if len(raws) < CHUNK:
                    break
                end -= CHUNK
    return found


def take_off(client: redis.Redis, found: Sequence[Queued]) -> list[Queued]:
    """Remove these messages from their lists (one pipelined round trip); return those really removed (a message a
    worker popped meanwhile is not)."""
    if not found:
        return []
    deletes = client.pipeline(transaction=False)
    for item in found:
        # From the tail, where the oldest wait: LREM compares from its starting end, so this finds them first.
        deletes.lrem(item.list, -1, item.raw)  # type: ignore[arg-type]  # redis-py sends bytes as they are
    return [item for item, gone in zip(found, deletes.execute(), strict=True) if gone]


def dequeue(client: redis.Redis, queues: Iterable[str], wanted: set[str]) -> set[str]:
    """Take the messages of `wanted` off every priority list of `queues`; return the ids really removed."""
    return {item.task_id for item in take_off(client, find(client, queues, wanted))}
