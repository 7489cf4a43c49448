"""API keys: `Authorization: Bearer <key>`, checked against the argon2id hashes in `RENDER_API_KEYS`.

A key is never stored or logged: the settings hold its hash, and a key seen valid once is remembered for this
process by its SHA-256 (argon2 costs tens of milliseconds on purpose; a request must not).
"""

from __future__ import annotations

import hashlib
import secrets
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from producer.errors import ConfigError
from service.errors import ApiError
from service.settings import ApiKey, Scope

KEY_PREFIX = "rk_"
_BEARER = {"WWW-Authenticate": "Bearer"}


def new_key() -> str:
    """A new random key (256 bits), shown once by `render api-key`."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The argon2id hash to configure for `key`."""
    return PasswordHasher().hash(key)


class Keys:
    """The configured keys; `check` answers a request's Authorization header with the scope it grants."""

    def __init__(self, keys: dict[str, ApiKey]) -> None:
        for name, entry in keys.items():
            # Checked here rather than by the settings, whose error would quote the value: a key pasted by
            # mistake where its hash belongs must not be printed.
            if not entry.hash.startswith("$argon2"):
                raise ConfigError(
                    f"RENDER_API_KEYS: the hash of key {name!r} is not an argon2 hash ($argon2id$...); configure "
                    "the hash `render api-key NAME` prints, never the key itself"
                )
        self.keys = keys
        self._hasher = PasswordHasher()
        self._seen: dict[str, tuple[str, Scope]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None, *, write: bool) -> str | None:
        """The name of the key the header carries; raise `ApiError` 401 (no or a wrong key) or 403 (a read-only
        key on a write). With no key configured, every request is let through (the service binds to loopback)."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "send an API key as `Authorization: Bearer <key>`", headers=_BEARER)
        name, scope = self._identify(token)
        if write and scope != "full":
            raise ApiError(403, "forbidden", f"API key {name!r} is read-only; this request needs a full-scope key")
        return name

    def tenant(self, name: str | None) -> str | None:
        """The tenant key `name` acts as (None: no key was asked for, the service's own client answers)."""
        return None if name is None else self.keys[name].tenant

    def _identify(self, token: str) -> tuple[str, Scope]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            known = self._seen.get(digest)
        if known is not None:
            return known
        for name, entry in self.keys.items():
            try:
                self._hasher.verify(entry.hash, token)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                continue
            with self._lock:
                self._seen[digest] = (name, entry.scope)
            return name, entry.scope
        raise ApiError(401, "unauthorized", "the API key is not valid; check it, or ask for a new one", headers=_BEARER)
