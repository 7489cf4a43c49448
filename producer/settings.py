"""Client settings (`RENDER_*`), read by the entrypoint that creates a `RenderClient`."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from producer.errors import ConfigError
from producer.fleet import HEARTBEAT_TTL, MAX_HEARTBEAT_TTL
from producer.keys import DEFAULT_QUEUE, DEFAULT_TENANT, tenant_name
from producer.redis_connect import SentinelOptions, is_sentinel, sentinel_addresses
from producer.webhooks import parse_allowed_hosts

S = TypeVar("S", bound=BaseSettings)


def listed(value: Any) -> Any:
    """A list setting as people write it: a JSON list (`'["a", "b"]'`) or the comma form (`a, b`); a list as is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'starts with \'[\' but is not a JSON list ({exc.msg}); write ["a", "b"] or a, b'
            ) from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError('must be a JSON list of strings, like ["a", "b"], or the comma form a, b')
        return items
    return [item.strip() for item in text.split(",") if item.strip()]


def _allowed_hosts(value: Any) -> tuple[str, ...]:
    try:
        # The comma form also takes spaces between entries, as it always has; a JSON list's entries are one host each.
        return parse_allowed_hosts(
            value if isinstance(value, str) and not value.lstrip().startswith("[") else listed(value)
        )
    except ConfigError as exc:  # its message names the setting and the entry; pydantic wants a ValueError
        raise ValueError(str(exc).removeprefix("RENDER_WEBHOOK_HOSTS: ")) from None


ListSetting = Annotated[list[str], NoDecode, BeforeValidator(listed)]
"""A `RENDER_*` list that takes a JSON list or the comma form (`RENDER_INPUT_ROOTS`, ...)."""


class ClientSettings(BaseSettings):
    """What an application needs to submit, follow and revoke jobs."""

    model_config = SettingsConfigDict(env_prefix="RENDER_", extra="ignore")

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="broker, result backend, revocation keys, leases. Password: `redis://:password@host:6379/0`. "
        "TLS: `rediss://:password@host:6380/0?ssl_ca_certs=/etc/ssl/redis-ca.pem` (certificates verified; "
        "`ssl_cert_reqs=none` turns that off, `ssl_certfile`/`ssl_keyfile` for client certificates). Never printed: "
        "logs and errors show `redis://:***@host`. Sentinel: `sentinel://:password@sentinel-1:26379/0;"
        "sentinel://sentinel-2:26379;sentinel://sentinel-3:26379` (failover: docs/operations.md)",
    )
    redis_master_name: str | None = Field(
        default=None,
        description="with a sentinel:// URL (required there): the name the sentinels monitor the master under",
    )
    redis_sentinel_password: str | None = Field(
        default=None,
        description="with a sentinel:// URL: the sentinels' own password, if they require one (the URL's password "
        "is the master's)",
    )
    queue: str = Field(
        default=DEFAULT_QUEUE,
        min_length=1,
        description="base queue name (producer and worker): jobs go to `render.<model>`; workers consume those of "
        "their models and the bare `render`",
    )
    tenant: str = Field(
        default=DEFAULT_TENANT,
        description="the tenant this client submits as (one the workers declare in RENDER_TENANTS); its jobs' ids "
        "begin with `<tenant>@`, and it reads only its own jobs (docs/tenants.md)",
    )
    revoke_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="seconds a revocation key lives (7 days)")
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="seconds results and job records live (7 days)")
    webhook_hosts: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_allowed_hosts)] = Field(
        default=(),
        description="hosts, IPs and CIDR networks a webhook may reach although they are private, loopback or "
        'link-local (producers and workers): a JSON list (`["hooks.internal", "10.0.0.0/8"]`) or the comma form '
        "(`hooks.internal, 10.0.0.0/8`)",
    )
    max_queued: int | None = Field(
        default=None,
        ge=1,
        description="the most jobs a model's queue (all its priorities) may hold: a submit that would go past it is "
        "refused with QueueFull (HTTP 429) and nothing is enqueued; unset: unbounded",
    )
    # Workers expire their advertisement after it; clients count a worker live for as long (set both alike).
    heartbeat_ttl: float = Field(
        default=HEARTBEAT_TTL,
        gt=0.0,
        le=MAX_HEARTBEAT_TTL,
        description="seconds a worker stays listed after its last heartbeat: a dead worker drops out within it; "
        "must exceed RENDER_HEARTBEAT_INTERVAL (checked at start)",
    )

    @property
    def sentinel(self) -> SentinelOptions:
        """`master_name` and `sentinel_password`, the keywords `producer.redis_connect.connect` takes."""
        return SentinelOptions(master_name=self.redis_master_name, sentinel_password=self.redis_sentinel_password)

    _tenant_name = field_validator("tenant")(tenant_name)

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> ClientSettings:
        if is_sentinel(self.redis_url):
            if not self.redis_master_name:
                raise ValueError(
                    "RENDER_REDIS_URL is a sentinel:// URL: set RENDER_REDIS_MASTER_NAME to the master's name"
                )
            sentinel_addresses(self.redis_url)  # each entry well-formed, or a clear ValueError
        return self


def load(cls: type[S]) -> S:
    """Read settings of class `cls` from the environment; any bad `RENDER_*` value is one `ConfigError` sentence."""
    try:
        return cls()
    except SettingsError as exc:
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"RENDER_{match.group(1).upper()}" if match else "a RENDER_* variable"
        raise ConfigError(f"{name} is not valid JSON; see docs/configuration.md") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            if not err["loc"]:  # a check across settings: its message names them
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            field, *rest = (str(part) for part in err["loc"])
            where = f"RENDER_{field.upper()}" + (f" ({'.'.join(rest)})" if rest else "")
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}; got {err.get('input')!r}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
