"""A TCP proxy on loopback that a test can break: cut every connection, refuse new ones, or slow traffic.

Put between the workers and Redis or the S3 server, it makes the network faults a render farm meets
(a broker that vanishes for seconds, an object store that stalls) without touching the servers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from localfarm.cluster import free_port


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` until told otherwise."""

    def __init__(self, target_port: int, *, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.delay = 0.0  # seconds added before each chunk forwarded from the server to the client
        self.connections = 0  # accepted so far: shows that clients came back after an outage
        self.downstream = 0  # bytes forwarded from the server to clients so far: shows what a client was sent
        self._flowing = threading.Event()  # cleared by hold(): answers from the server wait
        self._flowing.set()
        self.held = 0  # answers waiting now because of hold(): a client is mid-request
        self._requests_flowing = threading.Event()  # cleared by hold_at()'s marker: requests wait too
        self._requests_flowing.set()
        self._trigger: bytes | None = None
        self.triggered = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.up()
        return self

    def up(self) -> None:
        """Accept connections again (on the same port)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"proxy-{self.port}", daemon=True).start()

    def down(self) -> None:
        """Close every open connection and refuse new ones: the server looks gone (held answers die with it)."""
        self.release()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.cut()

    def cut(self) -> None:
        """Close every open connection; new ones are still accepted while the proxy is up."""
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @contextlib.contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        """Down for `seconds`, then up; the body runs while it is down."""
        self.down()
        started = time.monotonic()
        try:
            yield
        finally:
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))
            self.up()

    def hold(self) -> None:
        """Keep every answer from the server (already on its way or not) until `release`; requests still pass.

        A client in the middle of a request/answer exchange stays there, however slow the test is to act.
        """
        self._flowing.clear()

    def hold_at(self, marker: bytes) -> threading.Event:
        """Hold everything from the first request whose bytes contain `marker` on: that request waits before
        the server sees it, and every answer waits, until `release`. The event is set once it has happened.

        Unlike `hold` after polling, this stops a client at an exact point of its exchange however slow the
        machine is (an HTTP request line names its object, so `b"/image-1.png "` stops an upload of it).
        """
        self.triggered.clear()
        self._trigger = marker
        return self.triggered

    def release(self) -> None:
        self._trigger = None
        self._requests_flowing.set()
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down() closed the listener
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float | None) -> None:
        try:
            while chunk := source.recv(65536):
                pause = self.delay if delay is None else delay
                if pause:
                    time.sleep(pause)
                if delay is not None and self._trigger is not None and self._trigger in chunk:
                    self._trigger = None
                    self._requests_flowing.clear()
                    self._flowing.clear()
                    self.triggered.set()
                gate = self._flowing if delay is None else self._requests_flowing
                if not gate.is_set():
                    with self._lock:
                        self.held += 1
                    gate.wait()
                    with self._lock:
                        self.held -= 1
                if delay is None:  # counted before it is sent: a client never holds bytes not yet counted
                    with self._lock:
                        self.downstream += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
