"""Errors the client raises for a non-success reply, one class per HTTP status the service documents.

Callers branch on the class (or on `status`/`code`); `retry_after` tells a caller who was shed how long to back off.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any

import httpx

__all__ = [
    "BadRequest",
    "Conflict",
    "InvalidInput",
    "InvalidResponse",
    "KronserveClientError",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Unauthorized",
    "UnexpectedStatus",
    "Unreachable",
    "UnsupportedMediaType",
    "error_from_response",
    "error_from_transport",
    "parse_retry_after",
]

_MAX_TEXT_MESSAGE = 300  # a non-JSON body (a proxy's HTML page) is quoted only this far


class KronserveClientError(Exception):
    """Base of every error the client raises about a reply; `code` is the server's stable machine-readable name."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        # All fields go to Exception so the error pickles (e.g. across a process pool) with its fields intact.
        super().__init__(status, code, message, retry_after)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, retry_after={self.retry_after!r})"
        )


class BadRequest(KronserveClientError):
    """400: the request was malformed (e.g. an unreadable adapter file)."""


class Unauthorized(KronserveClientError):
    """401: an admin endpoint was called without the server's bearer token, or with a wrong one."""


class NotFound(KronserveClientError):
    """404: no adapter is registered under that task (or the URL is not a kronserve endpoint)."""


class Conflict(KronserveClientError):
    """409 `store_conflict`: the store holds something at the task's place that the server will not touch, or (S3)
    another gateway moved the task's pointer first; the latter is worth one retry."""


class PayloadTooLarge(KronserveClientError):
    """413: the upload or batch exceeds the server's limits."""


class UnsupportedMediaType(KronserveClientError):
    """415: the body's content type is not one the endpoint accepts."""


class InvalidInput(KronserveClientError):
    """422: the body parsed but failed validation (sizes, types, a spec the server refuses)."""


class Overloaded(KronserveClientError):
    """429 or 503: the server shed the request; retry after `retry_after` seconds when the server said so."""


class UnexpectedStatus(KronserveClientError):
    """Any status outside the documented set (e.g. a 500, or a 502 from a proxy in front of the server)."""


class Unreachable(KronserveClientError):
    """No reply at all (`status` 0): the server is down or unreachable (`code` "unreachable": the request was never
    sent, so it is safe to retry), or the connection failed or timed out mid-request (`code` "timeout" or
    "transport_error": it may have been processed). The httpx error is the `__cause__`."""

    def __str__(self) -> str:
        return self.message


class StreamError(KronserveClientError):
    """The server reported an error after a stream began (what was streamed before it stands)."""


class InvalidResponse(KronserveClientError):
    """A success status whose body does not have the documented shape: client and server disagree on the contract."""


_BY_STATUS: dict[int, type[KronserveClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidInput,
    429: Overloaded,
    503: Overloaded,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, which RFC 9110 allows as delta-seconds or as an HTTP-date.

    Returns None for a missing or unreadable header rather than raising: a bad hint must not hide the real error.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT, even when the zone is missing
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    """(code, message) from the documented error envelope, or the best stand-in when the body is something else."""
    fallback_code = f"http_{response.status_code}"
    try:
        body: Any = response.json()
    except ValueError:  # not JSON (or not decodable text): e.g. a proxy's HTML error page
        text = response.text.strip() if response.content else ""
        if len(text) > _MAX_TEXT_MESSAGE:
            text = text[:_MAX_TEXT_MESSAGE] + "…"
        return fallback_code, text or response.reason_phrase or "no message"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            message = error.get("message")
            return (
                code if isinstance(code, str) and code else fallback_code,
                message if isinstance(message, str) else str(message or response.reason_phrase or ""),
            )
        detail = body.get("detail")  # a framework-default reply (e.g. a route the server does not have)
        if detail is not None:
            return fallback_code, detail if isinstance(detail, str) else str(detail)
    return fallback_code, str(body)


def error_from_response(response: httpx.Response) -> KronserveClientError:
    """The exception a non-success reply stands for; never raises itself, whatever the body holds."""
    code, message = _error_fields(response)
    cls = _BY_STATUS.get(response.status_code, UnexpectedStatus)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return cls(response.status_code, code, message, retry_after)


def error_from_transport(exc: httpx.TransportError, url: str) -> Unreachable:
    """The `Unreachable` an httpx transport failure stands for; `code` says whether the request left this machine."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        code = "unreachable"
    elif isinstance(exc, httpx.TimeoutException):
        code = "timeout"
    else:
        code = "transport_error"
    return Unreachable(0, code, f"cannot reach {url}: {exc or type(exc).__name__}")


def is_retryable(error: KronserveClientError) -> bool:
    """Shed (429/503: nothing was done) or never sent: retrying cannot do anything twice."""
    return isinstance(error, Overloaded) or (isinstance(error, Unreachable) and error.code == "unreachable")
