"""kombu's Redis transport, hardened for a queue anyone with Redis write access can push to.

kombu turns each item it pops from the queue list into a message inside the worker's event loop: it
decodes the JSON, then reads the envelope (`properties`, `delivery_tag`, the base64 body). Anything
that raises there (not JSON, a JSON array nested 1,000 deep whose decoder raises `RecursionError`,
an envelope without its fields) would propagate out of that loop, and the consumer would die. The
item is already off the list by then, so nothing can be saved by dying: it is logged and dropped,
and the loop goes on. Errors raised after the message is handed to Celery are Celery's to handle and
pass through untouched. (Items that are envelopes but not task messages get Celery's own "Received
invalid task message" handling.)

`_brpop_start`, `_brpop_read` and `_get` follow kombu 5.7's own (pyproject bounds kombu to the versions
tested), with the decode step guarded and the lists of one poll in the worker's order of preference
(`worker.process.affinity`: its loaded model's queue first, unless a job elsewhere has waited too long).

The app's `AMQP` gives it a `Connection` that names its URL by the broker's scheme (`redis://`, `rediss://`,
`sentinel://`), not by this transport's import path: Flower picks its Broker tab's Redis client by that scheme.

Fair share. A poll takes, from each list in the worker's order, the next job of the tenants in weighted turn
(`worker.process.fairshare`, whose script `POP` this transport runs).

Reliable dequeue. kombu's BRPOP takes a message off its list on the server, and only the worker's own receipt
records it in kombu's `unacked` hash: a reply lost on the way (Redis stopped, the connection cut, the worker
killed between the two) lost the job, in no list, not unacked, not leased. Here a poll is one script (`POP`) that
pops the first message of the lists in the worker's order and, in the same atomic step, records it in the
`unacked` hash and index as kombu's receipt would (which then writes the same entry again). A reply that never
arrives leaves the job an unacknowledged delivery with no lease, which the recovery scan puts back on its queue
after its grace (or kombu after the visibility timeout). Scripts cannot block, so a poll that finds nothing is
followed by a wait that pops nothing: `BLMOVE` of the preferred normal-priority list onto itself (the list is
unchanged; it returns at once when a job arrives there), at most `render_poll_seconds` (`POLL_SECONDS`), after
which the next poll looks at every list again. An idle worker costs two commands per wait instead of one BRPOP
a second; a job costs one script call, as it cost one BRPOP.
"""

from __future__ import annotations

import logging
import uuid
from time import monotonic, time
from typing import Any

import redis
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.transport.virtual import Message as VirtualMessage
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from producer.keys import DEFAULT_PRIORITY, PRIORITIES
from worker.process.affinity import Affinity
from worker.process.fairshare import POP, POP_SHA, TENANTS_OPTION, tenants_arg

AFFINITY_OPTION = "render_affinity"  # broker_transport_options: the name the worker's `Affinity` is registered under
POLL_OPTION = "render_poll_seconds"  # broker_transport_options: the longest wait between two polls of every list
POLL_SECONDS = 0.5

log = logging.getLogger(__name__)

# Celery's `inspect stats` sends the broker options as JSON to whoever asks, so they hold a name, not the object.
_affinities: dict[str, Affinity] = {}  # one per worker app built in this process


def affinity_option(affinity: Affinity) -> dict[str, str]:
    """The broker transport option that hands `affinity` to the channels of the app's connections (this process)."""
    name = uuid.uuid4().hex
    _affinities[name] = affinity
    return {AFFINITY_OPTION: name}


class Undecodable(Exception):
    """Raised when an item popped from the queue cannot be made into a kombu message; it is dropped."""


def decode(item: bytes | str) -> Any:
    """The JSON document an item holds; `Undecodable` for anything the decoder raises, whatever its type."""
    try:
        return loads(bytes_to_str(item))
    except Exception as exc:  # RecursionError from deep nesting, bad UTF-8, bad JSON, ...
        raise Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}") from None


class Message(VirtualMessage):
    """kombu's message, refusing envelopes it cannot read with `Undecodable` instead of any error."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
            # Rejecting or restoring a message reads these; without them kombu's error looks like a lost connection.
            self.delivery_info["exchange"], self.delivery_info["routing_key"]
        except Exception as exc:  # KeyError, TypeError, bad base64 in the body, ...
            if isinstance(channel, Channel):  # the pop may have recorded it as delivered (its tag looked right)
                channel._forget(_tag_of(payload))
            raise Undecodable(f"not a message envelope ({type(exc).__name__}: {str(exc)[:200]})") from None


def _tag_of(payload: Any) -> str | None:
    """The delivery tag an envelope names, if it names one."""
    properties = payload.get("properties") if isinstance(payload, dict) else None
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return tag if isinstance(tag, str) else None


class Channel(kombu_redis.Channel):
    Message = Message

    def _connparams(self, asynchronous: bool = False) -> Any:
        # After a lost connection Celery collects the transport (its client is then None) and closes the channel
        # after, which restores unacknowledged messages through a new client: kombu's own fails on the None with
        # an AttributeError that Celery does not expect, and the worker stops ("Unrecoverable error"). As a
        # connection error the restore is skipped, as when Redis is down, and the worker reconnects; the jobs
        # in hand go on (their messages stay in kombu's unacked hash, which the recovery scanner watches).
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed (connection lost)")
        return super()._connparams(asynchronous=asynchronous)

    @property
    def affinity(self) -> Affinity | None:
        """The worker's queue preference, when its app put one in `broker_transport_options` (a consumer)."""
        name = self.connection.client.transport_options.get(AFFINITY_OPTION)
        return _affinities.get(name) if isinstance(name, str) else None

    _waiting = False  # the last poll found every list empty: the next command is the wait, not a poll
    _sent_wait = False  # the command in flight is the wait (its reply delivers nothing)

    @property
    def poll_seconds(self) -> float:
        """The longest wait between two polls of every list (`render_poll_seconds`, at most kombu's brpop_timeout)."""
        seconds = float(self.connection.client.transport_options.get(POLL_OPTION, POLL_SECONDS))
        return max(0.01, min(seconds, float(self.brpop_timeout or seconds)))

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        # Remember the queues consumed without acks (Celery's inspect replies): `POP` records every envelope it pops
        # as delivered, and nobody would ever ack those, so a later restore would put the reply back on its queue.
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    @property
    def _no_ack_queues(self) -> set[str]:
        queues: set[str] | None = self.__dict__.get("_no_ack")
        if queues is None:
            queues = self.__dict__["_no_ack"] = set()
        return queues

    def _brpop_start(self, timeout: Any = None) -> None:
        # kombu's own, except: a poll is the `POP` script over the lists in the worker's order of preference, and
        # a poll that found nothing is followed by a wait that pops nothing (the module's docstring says why).
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lists = [(pri, queue, self._q_for_pri(queue, pri)) for pri in self.priority_steps for queue in queues]
        affinity = self.affinity
        keys = affinity.order(lists) if affinity is not None else [name for _, _, name in lists]
        prefix = self.global_keyprefix or ""
        if self._waiting:
            step = self.priority(PRIORITIES[DEFAULT_PRIORITY])
            normal = {name for pri, _, name in lists if self.priority(pri) == step}
            wait = prefix + next((name for name in keys if name in normal), keys[0])
            command_args: list[Any] = ["BLMOVE", wait, wait, "RIGHT", "RIGHT", self.poll_seconds]
        else:
            command_args = self._pop_args(keys)
        self._sent_wait = self._waiting
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu declares it None
        self.client.connection.send_command(*command_args)

    def _pop_args(self, lists: list[str]) -> list[Any]:
        """EVALSHA of `POP` over `lists`, every key with the global prefix (kombu's prefixing covers one key), for the
        tenants the worker's transport options name."""
        prefix = self.global_keyprefix or ""
        keys = [prefix + key for key in (self.unacked_key, self.unacked_index_key, *lists)]
        tenants = tenants_arg(self.connection.client.transport_options.get(TENANTS_OPTION))
        return ["EVALSHA", POP_SHA, len(keys), *keys, repr(time()), prefix, tenants]

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                command = "BLMOVE" if self._sent_wait else "EVALSHA"
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            except redis.exceptions.NoScriptError:  # a new or restarted Redis: load it, poll again next time
                self._in_poll = None  # type: ignore[assignment]
                self.client.script_load(POP)
                self._waiting = False
                raise Empty() from None
            if self._sent_wait:  # a job arrived on the waited list, or the wait is over: poll every list again
                self._waiting = False
                raise Empty()
            if not reply:
                self._waiting = True
                raise Empty()
            dest, item, tag = reply
            dest = bytes_to_str(dest).removeprefix(self.global_keyprefix or "").rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = decode(item)
            except Undecodable as exc:
                self._forget(tag)
                _dropped(exc)
                raise Empty() from None
            if dest in self._no_ack_queues:
                self._forget(tag)
            if (affinity := self.affinity) is not None:
                affinity.delivered(dest)
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu resets its bool flag to None
            self._flush_brpop_reauth()

    def _get(self, queue: Any, timeout: Any = None) -> Any:  # kombu's Redis _get takes the queue only
        with self.conn_or_acquire() as client:
            args = self._pop_args([self._q_for_pri(queue, pri) for pri in self.priority_steps])
            try:  # redis-py's own, past kombu's prefixing: `_pop_args` prefixed every key
                reply = redis.Redis.execute_command(client, *args)
            except redis.exceptions.NoScriptError:
                client.script_load(POP)
                reply = redis.Redis.execute_command(client, *args)
            self._maybe_update_queues_expire(client, queue)
            if not reply:
                raise Empty()
            _, item, tag = reply
            try:
                return decode(item)
            except Undecodable as exc:
                self._forget(tag)
                _dropped(exc)
                raise Empty() from None

    def _forget(self, tag: Any) -> None:
        """A dropped item that `POP` recorded as delivered: out of kombu's unacked hash and index again."""
        if tag:
            self.qos._remove_from_indices(bytes_to_str(tag)).execute()


class Transport(kombu_redis.Transport):
    Channel = Channel
    url_scheme = "redis"  # how `Connection.as_uri` names it

    def _deliver(self, message: Any, queue: str) -> None:
        try:
            super()._deliver(message, queue)
        except Undecodable as exc:  # raised by Message() inside kombu's delivery callback
            _dropped(exc)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The hardened channel, reaching the master through Redis Sentinel (a `sentinel://` broker URL)."""


class SentinelTransport(Transport):
    default_port = 26379  # type: ignore[assignment]  # kombu declares it None
    Channel = SentinelChannel
    url_scheme = "sentinel"


class Connection(KombuConnection):
    """kombu's connection, whose URL begins with the broker's scheme rather than this module's transport path."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:  # include_password, mask: kombu's
        uri = str(super().as_uri(*args, **kwargs))
        transport = self.get_transport_cls()
        prefix = f"{self.transport_cls}://"
        if not issubclass(transport, Transport) or not uri.startswith(prefix):
            return uri
        scheme = "rediss" if transport.url_scheme == "redis" and self.ssl else transport.url_scheme
        return f"{scheme}://{uri.removeprefix(prefix)}"

    def info(self) -> dict[str, Any]:
        """kombu's, with the sentinels' password masked: Celery's `inspect stats` sends this to whoever asks (and
        drops the Redis password itself)."""
        info = dict(super().info())
        options = info.get("transport_options") or {}
        if (options.get("sentinel_kwargs") or {}).get("password"):
            info["transport_options"] = {**options, "sentinel_kwargs": {**options["sentinel_kwargs"], "password": "**"}}
        return info

    def __reduce__(self) -> Any:  # kombu's, from the unmasked info
        return self.__class__, tuple(dict(self._info()).values()), None


class AMQP(CeleryAMQP):
    """Celery's messaging glue, making this module's `Connection`s (`Celery(amqp=AMQP)`)."""

    Connection = Connection


def _dropped(exc: Undecodable) -> None:
    log.error("dropped an item on the queue that is not a task message (%s)", exc)
