"""Durable adapter versions: one interface, a local directory (default) or an S3-compatible bucket."""

from __future__ import annotations

from .base import AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of
from .local import FAULT_POINTS, CheckReport, LocalStore


def open_store(location: str, endpoint_url: str | None = None, fault_point: str | None = None) -> AdapterStore:
    """`s3://bucket/optional/prefix` -> S3Store, anything else -> a LocalStore directory.

    boto3 is imported only for an s3:// location, so the local default never needs it installed.
    """
    if not location.startswith("s3://"):
        return LocalStore(location, fault_point)
    if fault_point is not None:
        raise ValueError("fault_point is a test hook of the local store; it does nothing for s3://")
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{location!r}: expected s3://bucket or s3://bucket/prefix")
    try:
        from .s3 import S3Store
    except ImportError as e:
        raise StoreError(f"{location}: the S3 store needs boto3 (pip install 'kronserve[s3]')") from e
    return S3Store(bucket, prefix, endpoint_url)


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
