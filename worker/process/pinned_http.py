"""HTTP(S) connections for webhooks: pinned to the addresses the SSRF guard checked, and bounded as a whole.

http.client's `timeout` bounds each socket operation alone, so a receiver answering a byte at a time would
hold a connection for as long as it liked. Here one deadline covers connecting, the TLS handshake, sending
the request and reading the whole answer.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from producer.webhooks import IPAddress

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class Deadline:
    """One time limit that every socket operation of an exchange shares."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; TimeoutError once there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the exchange took over {self.seconds:g} s")
        return left


class _ReadUntil(io.RawIOBase):
    """Reads from a socket until a deadline: each read waits only for the time left, so a trickle cannot stretch it."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self.sock.settimeout(self.deadline.left())
        return self.sock.recv_into(buffer)


class _BoundedResponse(http.client.HTTPResponse):
    """An answer read whole within the timeout its socket had when the answer began (set by `getresponse`)."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        budget = sock.gettimeout()
        if budget is not None:
            self.fp.close()  # http.client's own file waits up to the timeout for each read
            self.fp = io.BufferedReader(_ReadUntil(sock, Deadline(budget)))


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to `host` (its Host header) whose TCP connection goes only to the checked `addresses`.

    `timeout` bounds the whole exchange from when the connection is made: connecting, sending the request and
    reading the answer, however slowly it trickles (http.client alone bounds each socket operation).
    """

    response_class = _BoundedResponse

    def __init__(self, host: str, port: int, *, addresses: Sequence[IPAddress], timeout: float, **options: Any) -> None:
        super().__init__(host, port, timeout=timeout, **options)
        self.addresses = list(addresses)
        self.deadline = Deadline(timeout)

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.port, self.deadline)

    def send(self, data: Any) -> None:
        if self.sock is not None:
            self.sock.settimeout(self.deadline.left())
        super().send(data)

    def getresponse(self) -> http.client.HTTPResponse:
        if self.sock is not None:
            self.sock.settimeout(self.deadline.left())  # what `_BoundedResponse` reads the whole answer within
        return super().getresponse()


class PinnedHTTPSConnection(PinnedHTTPConnection, http.client.HTTPSConnection):
    """HTTPS to the checked `addresses`, with SNI and certificate verification against `host` (the URL's name)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        addresses: Sequence[IPAddress],
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = context or ssl.create_default_context()
        super().__init__(host, port, addresses=addresses, timeout=timeout, context=self.tls)

    def connect(self) -> None:
        sock = _connect(self.addresses, self.port, self.deadline)
        try:
            sock.settimeout(self.deadline.left())  # the handshake as a whole
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _connect(addresses: Sequence[IPAddress], port: int, deadline: Deadline) -> socket.socket:
    error: OSError = OSError("no address to connect to")
    for address in addresses:
        left = deadline.left()
        try:
            sock = socket.create_connection((str(address), port), left)
        except OSError as exc:
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error
