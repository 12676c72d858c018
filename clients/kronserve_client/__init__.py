"""Python client for the kronserve REST API: `KronserveClient` (blocking) and `AsyncKronserveClient` (asyncio)."""

from .client import AsyncKronserveClient, FileSpec, KronserveClient
from .errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    InvalidResponse,
    KronserveClientError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnexpectedStatus,
    Unreachable,
    UnsupportedMediaType,
    error_from_response,
)
from .models import AdapterInfo, AdapterSpec, PredictResult, ScoreResult

__all__ = [
    "AdapterInfo",
    "AdapterSpec",
    "AsyncKronserveClient",
    "BadRequest",
    "Conflict",
    "FileSpec",
    "InvalidInput",
    "InvalidResponse",
    "KronserveClient",
    "KronserveClientError",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PredictResult",
    "ScoreResult",
    "Unauthorized",
    "UnexpectedStatus",
    "Unreachable",
    "UnsupportedMediaType",
    "error_from_response",
]
