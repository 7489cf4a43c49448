"""The API's one error shape, `{"error": {"code", "message", "field"}}`, and how each error becomes it.

Codes are stable (clients branch on them); messages are the sentences the CLI prints for the same mistake.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.errors import (
    BatchFileError,
    FarmUnavailable,
    IdempotencyConflict,
    NoWorkerForModel,
    QueueFull,
    QuotaExceeded,
    RenderError,
    SpecError,
    StorageError,
    StorageUnavailable,
    UnknownTenant,
    WaitTimeout,
)

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5.0
"""Seconds a full queue's 429 asks a client to wait when the producer gives no estimate."""

# The first class the error is an instance of decides (subclasses before their parents).
_RENDER_ERRORS: list[tuple[type[RenderError], str, int]] = [
    (IdempotencyConflict, "idempotency_conflict", 422),
    (SpecError, "invalid_spec", 422),
    (NoWorkerForModel, "no_worker_for_model", 409),
    (QuotaExceeded, "quota_exceeded", 429),
    (QueueFull, "queue_full", 429),
    (UnknownTenant, "unknown_tenant", 403),
    (FarmUnavailable, "unavailable", 503),
    (StorageUnavailable, "unavailable", 503),
    (StorageError, "storage_error", 502),
    (WaitTimeout, "timeout", 504),
]
_HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: ("payload_too_large"),
}


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    lines: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    """Every error the API answers."""

    error: ErrorBody


class ApiError(Exception):
    """Raised by a route to answer an error with a stable `code`."""

    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "field": field, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def field_of(problem: str) -> str | None:
    """The field a `field: message` problem names (as `SpecError.problems` hold them), or None."""
    head, sep, _ = problem.partition(": ")
    return head if sep and " " not in head else None


def _line_problems(errors: list[str]) -> list[dict[str, Any]]:
    """`line 3: prompt: must be ...` -> {"line": 3, "field": "prompt", "message": "must be ..."}."""
    found = []
    for error in errors:
        head, _, rest = error.partition(": ")
        line = int(head.removeprefix("line ")) if head.startswith("line ") and head[5:].isdigit() else None
        field = field_of(rest)
        message = rest.partition(": ")[2] if field else rest
        found.append({"line": line, "field": field, "message": message})
    return found


def render_error_response(exc: RenderError) -> JSONResponse:
    """The answer to an error the producer raised, by its class (see `_RENDER_ERRORS`)."""
    code, status = next(
        ((code, status) for cls, code, status in _RENDER_ERRORS if isinstance(exc, cls)), ("internal", 500)
    )
    message = str(exc)
    if status >= 500 and code == "internal":
        log.error("unexpected %s: %s", type(exc).__name__, message)
    field = None
    extra: dict[str, Any] = {}
    headers = None
    if isinstance(exc, SpecError):
        if isinstance(exc, BatchFileError):
            extra["lines"] = _line_problems(exc.errors)
            field = extra["lines"][0]["field"] if extra["lines"] else None
        else:
            field = field_of(exc.problems[0]) if exc.problems else None
        if code == "idempotency_conflict":
            field = "Idempotency-Key"
    if isinstance(exc, QueueFull):
        retry = exc.retry_after or DEFAULT_RETRY_AFTER
        headers = {"Retry-After": str(max(1, round(retry)))}
    if code == "no_worker_for_model":
        field = "model"
    if isinstance(exc, UnknownTenant):
        # Over HTTP the tenant is the API key's, not the caller's RENDER_TENANT: the fix is in RENDER_API_KEYS.
        message = message.replace("(RENDER_TENANT)", "(the API key's tenant in RENDER_API_KEYS)").replace(
            "or set RENDER_TENANT to one of those", "or give the key one of those"
        )
    return error_response(status, code, message, field=field, headers=headers, **extra)


def install(app: FastAPI) -> None:
    """Answer every error the app can meet in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)

    @app.exception_handler(RenderError)
    async def _render_error(request: Request, exc: RenderError) -> JSONResponse:
        return render_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("query", "header", "path", "body")]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
        return error_response(422, "invalid_request", message, field=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail) if exc.detail else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))
