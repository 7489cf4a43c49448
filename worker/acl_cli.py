"""`render redis-acl`: the farm's Redis ACL users, one per role (producer.acl), applied to a server or written as
an ACL file. Passwords come from the environment (`RENDER_ACL_PASSWORD_<ROLE>`) and are never printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import redis
import typer

from producer import acl
from producer.errors import ConfigError
from producer.keys import DEFAULT_QUEUE
from producer.reaching import redacted
from producer.tenants import parse_tenants

ADMIN_URL_ENV = "RENDER_ACL_ADMIN_URL"


def redis_acl(
    apply: Annotated[
        bool, typer.Option("--apply", help=f"ACL SETUSER each user on the server {ADMIN_URL_ENV} reaches.")
    ] = False,
    file: Annotated[
        str | None, typer.Option("--file", help="Write an ACL file (aclfile) here, mode 600; '-' prints it.")
    ] = None,
    disable_default: Annotated[
        bool,
        typer.Option("--disable-default/--keep-default", help="Turn the default (password-only) user off."),
    ] = True,
    save: Annotated[
        bool, typer.Option("--save", help="With --apply: ACL SAVE, for a server started with an aclfile.")
    ] = False,
    redis_version: Annotated[
        str, typer.Option(help="With --file: the version of the Redis that loads it (7.0 lacks CLIENT SETINFO).")
    ] = "7.2",
) -> None:
    """Create the farm's Redis users (worker, service, monitor, producer.<tenant>), each allowed only what its
    role needs (docs/operations.md, Least privilege on Redis). Tenants from RENDER_TENANTS, queue from
    RENDER_QUEUE, passwords from RENDER_ACL_PASSWORD_WORKER, _SERVICE, _MONITOR, _PRODUCER_<TENANT>; a role
    without its password is skipped."""
    if apply == (file is not None):
        raise ConfigError("give exactly one of --apply (to a server) or --file PATH (an ACL file)")
    try:
        tenants = parse_tenants(os.environ.get("RENDER_TENANTS", ""))
        made = acl.roles(tenants, os.environ.get("RENDER_QUEUE") or DEFAULT_QUEUE)
    except ValueError as exc:
        raise ConfigError(f"RENDER_TENANTS: {exc}") from None
    secrets = acl.passwords(made)
    for role in made:
        if role.user not in secrets:
            typer.echo(f"skipped {role.user}: {role.password_env} is not set", err=True)
    if not secrets:
        raise ConfigError(f"no role has a password: set {', '.join(role.password_env for role in made)}")
    if file is not None:
        _write(file, acl.acl_file(made, secrets, default_off=disable_default, server=_version(redis_version)))
        return
    _apply(made, secrets, disable_default=disable_default, save=save)


def _apply(made: list[acl.Role], secrets: dict[str, str], *, disable_default: bool, save: bool) -> None:
    url = os.environ.get(ADMIN_URL_ENV)
    if not url:
        raise ConfigError(f"--apply needs {ADMIN_URL_ENV}: redis://ADMIN_USER:PASSWORD@HOST:6379/0")
    admin = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        done = acl.apply(admin, made, secrets, default_off=disable_default)
        if save:
            admin.execute_command("ACL", "SAVE")  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"{ADMIN_URL_ENV}: {exc}") from None
    except redis.RedisError as exc:
        raise ConfigError(f"{ADMIN_URL_ENV} ({redacted(url)}): {type(exc).__name__}: {exc}") from None
    finally:
        admin.close()
    for user in done:
        typer.echo(f"set ACL user {user}")
    if disable_default:
        typer.echo("turned the default user off")


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    target.unlink(missing_ok=True)  # created anew, so its mode is 600 even where a looser file was
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    typer.echo(f"wrote {target} (mode 600)", err=True)


def _version(text: str) -> acl.Version:
    try:
        major, minor, *_ = (int(part) for part in text.split("."))
    except ValueError:
        raise ConfigError(f"--redis-version: {text!r} is not a version like 7.2") from None
    return major, minor
