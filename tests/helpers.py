"""Helpers shared by the test tiers. Ports and waiting come from `worker.local_cluster`, which the demo uses too."""

from __future__ import annotations

import http.client
import socket
from urllib.parse import urlsplit

from worker.local_cluster import free_port, wait_until

__all__ = ["free_port", "http_answers", "port_open", "wait_until"]


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
