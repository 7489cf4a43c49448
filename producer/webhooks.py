"""Webhooks for finished jobs: the signature receivers check, the SSRF guard on webhook URLs, and delivery state.

A worker POSTs a job's JSON to its webhook URL, signed with HMAC-SHA256 under `RENDER_WEBHOOK_SECRET` in the
`X-Render-Signature` header (`sha256=<hex>`). A receiver checks it with `verify` (no other import needed):

    if not verify(secret, request_body, request.headers.get("X-Render-Signature")):
        return 401

The URL may not point into the farm's own network (loopback, private, link-local such as the cloud metadata
address 169.254.169.254, ...) unless its host is listed in `RENDER_WEBHOOK_HOSTS`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

import redis

from producer.errors import ConfigError, SpecError
from producer.keys import webhook_key
from producer.records import text as _text

SIGNATURE_HEADER = "X-Render-Signature"
MAX_URL_LENGTH = 2048
HOSTS_SETTING = "RENDER_WEBHOOK_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int, int, int], Sequence[tuple[Any, ...]]]
"""`socket.getaddrinfo(host, port, family, type)`, or a stand-in with its signature and errors."""

_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_METADATA = ipaddress.ip_address("169.254.169.254")


def sign(secret: str, body: bytes) -> str:
    """The `X-Render-Signature` value for `body`: `sha256=` and the hex HMAC-SHA256 of the body under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` (the `X-Render-Signature` a request came with) signs `body` under `secret`."""
    if not secret or not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode(errors="replace"))


def parse_allowed_hosts(value: str | Sequence[str]) -> tuple[str, ...]:
    """`RENDER_WEBHOOK_HOSTS` as normalised entries: lower-case hostnames, IP addresses and CIDR networks.

    `value` is comma or space separated (`"hooks.internal, 10.0.0.0/8, 127.0.0.1"`) or a list of single entries.
    A malformed entry raises ConfigError naming it.
    """
    listed = value.replace(",", " ").split() if isinstance(value, str) else [entry.strip() for entry in value]
    entries: list[str] = []
    for entry in listed:
        normalised = _normalise_entry(entry)
        if normalised not in entries:
            entries.append(normalised)
    return tuple(entries)


def _normalise_entry(entry: str) -> str:
    bare = entry.strip("[]")
    if "/" in bare:
        try:
            return str(ipaddress.ip_network(bare))
        except ValueError as exc:
            raise ConfigError(
                f"{HOSTS_SETTING}: {entry!r} is not a valid CIDR network ({exc}); write it as 10.0.0.0/8 "
                "(no host bits set) or list a single address"
            ) from None
    try:
        return str(_unmapped(ipaddress.ip_address(bare)))
    except ValueError:
        pass
    name = bare.lower().rstrip(".")
    if not _HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit():
        raise ConfigError(
            f"{HOSTS_SETTING}: {entry!r} is not a hostname, IP address or CIDR network; list entries such as "
            "hooks.internal, 10.0.0.0/8 or 127.0.0.1, separated by commas or spaces"
        )
    return name


def check_webhook_url(
    url: str, allowed_hosts: Sequence[str], *, field: str = "webhook", resolve: Resolver = socket.getaddrinfo
) -> list[IPAddress]:
    """Refuse a URL a worker must not POST to; return the addresses it may connect to (to pin them).

    Raises SpecError (the message starts with `field`) for a scheme other than http/https, a missing host,
    credentials in the URL, a URL over 2048 characters, a name that does not resolve, or a host that is or
    resolves to any loopback, private, link-local, reserved, multicast or unspecified address, unless the
    host (by name, or by address within a listed address or network) is in `allowed_hosts`. Names are looked up
    with `resolve`.
    """
    parts = _split(url, field)
    host = (parts.hostname or "").rstrip(".")
    names, networks = _allow_list(allowed_hosts)
    try:
        literal: IPAddress | None = _unmapped(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        literal = None
    addresses = [literal] if literal is not None else _resolve(host, parts, field, resolve)
    if host in names:
        return addresses
    for address in addresses:
        reason = _why_internal(address)
        if reason and not any(address in network for network in networks):
            shown = host if literal is not None else f"{host} resolves to {address}, which"
            raise SpecError(
                f"{field}: {shown} is {reason}; webhooks go only to public addresses. If this receiver is "
                f"meant, add the host ({host}) to {HOSTS_SETTING}"
            )
    return addresses


def _split(url: str, field: str) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise SpecError(f"{field}: the URL must be at most {MAX_URL_LENGTH} characters long; got {len(url)}")
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise SpecError(f"{field}: the URL contains spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise SpecError(f"{field}: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise SpecError(f"{field}: the URL must start with http:// or https://; got {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise SpecError(f"{field}: the URL must not hold a user name or password; receivers check the signature")
    if not (parts.hostname or "").rstrip("."):
        raise SpecError(f"{field}: the URL has no host; write it as https://host/path")
    return parts


def _resolve(host: str, parts: SplitResult, field: str, resolve: Resolver) -> list[IPAddress]:
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        infos = resolve(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise SpecError(f"{field}: the host {host} does not resolve ({exc}); check the URL's spelling") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = _unmapped(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise SpecError(f"{field}: the host {host} does not resolve to any address; check the URL's spelling")
    return addresses


def _allow_list(allowed_hosts: Sequence[str]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in parse_allowed_hosts(allowed_hosts):
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            names.add(entry)
    return names, networks


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:127.0.0.1` is 127.0.0.1 on the wire, so it is judged (and connected to) as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _why_internal(address: IPAddress) -> str | None:
    if address == _METADATA:
        return "the cloud metadata address"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),  # e.g. 100.64.0.0/10, shared carrier-grade NAT space
    )
    return next((reason for internal, reason in checks if internal), None)


def delivery_state(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    """A task's webhook delivery as the workers record it; None if no webhook was ever queued for it.

    Keys: url, state (pending, retrying, delivered or failed), attempts, last_status (HTTP status),
    last_error, delivered_at and next_attempt_at (epoch seconds); a field not recorded yet is None.
    """
    fields = {_text(k): _text(v) for k, v in client.hgetall(webhook_key(task_id)).items()}
    if not fields:
        return None

    def number(name: str, kind: type[Any]) -> Any:
        value = fields.get(name) or None
        return kind(value) if value is not None else None

    return {
        "url": fields.get("url"),
        "state": fields.get("state"),
        "attempts": number("attempts", int),
        "last_status": number("last_status", int),
        "last_error": fields.get("last_error") or None,
        "delivered_at": number("delivered_at", float),
        "next_attempt_at": number("next_attempt_at", float),
    }
