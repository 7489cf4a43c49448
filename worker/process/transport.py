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
"""

from __future__ import annotations

import logging
import uuid
from time import monotonic
from typing import Any

import redis
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.transport.virtual import Message as VirtualMessage
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from worker.process.affinity import Affinity

AFFINITY_OPTION = "render_affinity"  # broker_transport_options: the name the worker's `Affinity` is registered under

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
            raise Undecodable(f"not a message envelope ({type(exc).__name__}: {str(exc)[:200]})") from None


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

    def _brpop_start(self, timeout: Any = None) -> None:
        # kombu's own, except for the order of the lists named in BRPOP: that order is the worker's preference.
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lists = [(pri, queue, self._q_for_pri(queue, pri)) for pri in self.priority_steps for queue in queues]
        affinity = self.affinity
        keys = affinity.order(lists) if affinity is not None else [name for _, _, name in lists]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu declares it None
        command_args = ["BRPOP", *keys, timeout or 0]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = decode(item)
            except Undecodable as exc:
                _dropped(exc)
                raise Empty() from None
            if (affinity := self.affinity) is not None:
                affinity.delivered(dest)
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu resets its bool flag to None
            self._flush_brpop_reauth()

    def _get(self, queue: Any, timeout: Any = None) -> Any:  # kombu's Redis _get takes the queue only
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    try:
                        return decode(item)
                    except Undecodable as exc:
                        _dropped(exc)
                        raise Empty() from None
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


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
