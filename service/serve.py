"""Run the app with uvicorn: `render serve`. Without API keys it binds to loopback only."""

from __future__ import annotations

import ipaddress
import logging
import re

from producer.errors import ConfigError
from service.settings import ServiceSettings

log = logging.getLogger("service")
_TOKEN = re.compile(r"(access_token=)[^&\s\"]+")


class RedactTokens(logging.Filter):
    """Keys given as `?access_token=` (event streams, files) never reach the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN.sub(r"\1<redacted>", a) if isinstance(a, str) else a for a in record.args)
        record.msg = _TOKEN.sub(r"\1<redacted>", str(record.msg))
        return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: ServiceSettings, host: str) -> None:
    """Refuse a non-loopback `host` when no API key is configured (`ConfigError`, one sentence)."""
    if not settings.api_keys and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: no API key is configured, so the service binds to loopback only (anyone who reaches "
            "it could submit and cancel jobs); set RENDER_API_KEYS (make a key with `render api-key NAME`) or use "
            "--host 127.0.0.1"
        )


def serve(settings: ServiceSettings, host: str, port: int) -> None:
    """Serve until interrupted."""
    import uvicorn

    from service.app import create_app

    check_bind(settings, host)
    app = create_app(settings)  # a bad setting stops here, before anything is logged as served
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if settings.api_keys:
        log.info(
            "%d API key(s) configured (%s); requests need one", len(settings.api_keys), ", ".join(settings.api_keys)
        )
    else:
        log.warning("no API key configured (RENDER_API_KEYS): no key is asked for, bound to loopback only (%s)", host)
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
