"""The one place kronserve errors become HTTP: `{"error": {"code", "message"}}` with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from ..errors import (
    BadRequest,
    BankFull,
    ClientClosed,
    InvalidAdapter,
    InvalidRequest,
    KronserveError,
    Overloaded,
    PayloadTooLarge,
    PinRefused,
    Unauthorized,
    UnknownTask,
    UnsupportedFormat,
)
from ..store import StoreConflict, StoreError
from .connections import BODY_TIMEOUT, CLIENT_CLOSED

log = logging.getLogger(__name__)

# Most specific first.
STATUS: list[tuple[type[KronserveError], int]] = [
    (BadRequest, 400),
    (Unauthorized, 401),
    (UnknownTask, 404),
    (StoreConflict, 409),
    (PinRefused, 409),
    (PayloadTooLarge, 413),
    (UnsupportedFormat, 415),
    (ClientClosed, 499),
    (InvalidAdapter, 422),
    (InvalidRequest, 422),
    (Overloaded, 503),
    (BankFull, 503),
    (StoreError, 503),
]
_HTTP_CODES = {
    400: "malformed_json",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_format",
    BODY_TIMEOUT: "body_timeout",
    CLIENT_CLOSED: "client_closed",
}
RETRY_AFTER_S = 5  # for a full bank or a failing store: the operator's problem, so not a tight retry loop


def status_of(error: KronserveError) -> int:
    return next((status for cls, status in STATUS if isinstance(error, cls)), 500)


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    backend = getattr(request.app.state, "backend", None)
    if backend is not None:
        backend.metrics.failures.labels(endpoint_of(request), code).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def endpoint_of(request: Request) -> str:
    """The route template (`/v1/adapters/{task}`), so metric labels stay bounded."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method the request's path serves, for a 405's `Allow` (Starlette's names only one route's): the
    methods some route fully matches for this path."""
    routes = request.app.router.routes
    return ", ".join(
        m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KronserveError)
    async def _kronserve(request: Request, exc: KronserveError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Overloaded) else None
        if isinstance(exc, (StoreError, BankFull)) and status == 503:  # store failing or unreadable; no free slot
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        if status == 500:
            log.error("internal error on %s: %s", request.url.path, exc)
        return error_response(request, status, exc.code, str(exc), headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_closed(request: Request, exc: ClientDisconnect) -> JSONResponse:
        """The client closed the connection mid-request: its own status and code, no traceback, never a 5xx."""
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return error_response(request, CLIENT_CLOSED, "client_closed", "the client closed the connection")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, 400, "malformed_json", "request body is not valid JSON")
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
        return error_response(request, 422, "validation_error", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(request, exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, "internal", "internal server error")
