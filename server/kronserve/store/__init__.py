"""Durable adapter versions: one interface, a local directory (default) or an S3-compatible bucket."""

from __future__ import annotations

from .base import AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of
from .local import FAULT_POINTS, CheckReport, LocalStore

__all__ = [
    "FAULT_POINTS",
    "AdapterStore",
    "CheckReport",
    "LocalStore",
    "StoreConflict",
    "StoreError",
    "VersionRef",
    "check_task_id",
    "sha256_of",
]
