"""Python client for the kronserve REST API: `KronserveClient` (blocking) and `AsyncKronserveClient` (asyncio)."""

from .client import AsyncKronserveClient, FileSpec, KronserveClient
from .errors import (
    BadRequest,
    InvalidInput,
    InvalidResponse,
    KronserveClientError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnexpectedStatus,
    UnsupportedMediaType,
    error_from_response,
)
from .models import AdapterInfo, PredictResult, ScoreResult

__all__ = [
    "AdapterInfo",
    "AsyncKronserveClient",
    "BadRequest",
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
    "UnsupportedMediaType",
    "error_from_response",
]
