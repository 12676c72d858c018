"""Python client for the kronserve REST API: `KronserveClient` (blocking) and `AsyncKronserveClient` (asyncio)."""

from .client import AsyncKronserveClient, FileSpec, KronserveClient, Sampling
from .errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    InvalidResponse,
    KronserveClientError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    StreamError,
    Unauthorized,
    UnexpectedStatus,
    Unreachable,
    UnsupportedMediaType,
    error_from_response,
)
from .models import AdapterInfo, AdapterSpec, PredictResult, ScoreResult, StreamDelta

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
    "Sampling",
    "ScoreResult",
    "StreamDelta",
    "StreamError",
    "Unauthorized",
    "UnexpectedStatus",
    "Unreachable",
    "UnsupportedMediaType",
    "error_from_response",
]
