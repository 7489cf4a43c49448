"""Helpers shared by the test tiers. Ports and waiting come from `worker.local_cluster`, which the demo uses too."""

from __future__ import annotations

import http.client
import io
import socket
from urllib.parse import urlsplit

from PIL import Image

from worker.local_cluster import free_port, wait_until
from worker.storage import Storage

__all__ = ["free_port", "http_answers", "pixels", "port_open", "wait_until"]


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_answers(url: str) -> bool:
    """Whether `url` answers an HTTP GET with any status at all."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1)
    try:
        connection.request("GET", parts.path or "/")
        return connection.getresponse().status > 0
    finally:
        connection.close()


def pixels(storage: Storage, url: str) -> bytes:
    """The decoded pixels of a stored image (PNG metadata differs between tasks; pixels must not)."""
    data = storage.get(url.removeprefix(storage.base_url + "/"))
    assert data is not None, f"{url} is not in storage"
    return Image.open(io.BytesIO(data)).tobytes()
