"""The S3 store: adapter versions in an S3-compatible bucket (AWS S3, MinIO), shared by every replica.

Layout, all under `prefix`:

    <task>/versions/<sha256>.safetensors   immutable, content-addressed version objects
    <task>/ACTIVE                           {"version": 3, "sha256": "..."}: the task's pointer
    EPOCH                                   a new random token after every activate and delete

The pointer is the commit point. Moving it is a conditional write (`If-Match` the ETag read a moment
before, `If-None-Match: *` for a new task) that also requires the pointer to still name the version
the upload was numbered after; so of two gateways uploading one task at once, exactly one wins and the
other gets `StoreConflict` (409, retry) instead of silently overwriting it. What follows the pointer
move (epoch, removing replaced objects) is best-effort: a leftover object is an orphan that is never
served, and raising there would make the registry undo an upload the store has already committed.

Content addressing means identical bytes share a key: a re-upload of the active bytes writes the same
object again, and neither `activate` nor `discard` ever removes the object the pointer names.
Prefixes of two stores in one bucket must not nest (`a/` and `a/b/`); siblings are isolated.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from ..errors import UnknownTask
from .base import TASK_ID_RE, AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of

log = logging.getLogger(__name__)

ACTIVE = "ACTIVE"
EPOCH = "EPOCH"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}


class _Missing(Exception):
    """Internal: the key does not exist (the caller decides what absence means)."""


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the standard credential chain (env, profile, instance role).

    A custom endpoint (MinIO) gets path-style addressing, since `bucket.host` rarely resolves there;
    bounded retries and timeouts keep an unreachable endpoint a prompt error, not a hang.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


class S3Store(AdapterStore):
    parallel_reads = 16

    page_size = 1000  # keys per listing request (the S3 maximum)

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client: Any | None = None
    ) -> None:
        """`client` (a boto3 S3 client) is for tests and custom sessions; otherwise one is made from the env."""
        if not bucket:
            raise ValueError("an S3 store needs a bucket name")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client if client is not None else make_client(endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    # ---- the interface -----------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Tasks with a pointer, from one flat listing.

        A flat listing returns ~2 keys per task (its pointer and active version), so a few pages cover
        thousands of tasks; `Delimiter="/"` would only give task names and cost one HEAD per task, and
        delimiters other than "/" are not portable (MinIO).
        """
        found = []
        for key in self._keys(self.prefix):
            task, _, rest = key[len(self.prefix) :].partition("/")
            if rest == ACTIVE and TASK_ID_RE.fullmatch(task):
                found.append(task)
        return sorted(found)

    def active(self, task: str) -> VersionRef | None:
        return self._pointer(task)[0]

    def read(self, ref: VersionRef) -> bytes:
        key = self._version_key(ref)
        try:
            data, _ = self._get(key)
        except _Missing:
            raise StoreError(f"task {ref.task!r} version {ref.version}: object {key} is missing") from None
        if sha256_of(data) != ref.sha256:
            raise StoreError(f"task {ref.task!r} version {ref.version}: file content does not match its sha256")
        return data

    def write(self, task: str, data: bytes) -> VersionRef:
        """Numbered after the active version; another gateway may pick the same number, and then only
        the first to `activate` wins (see the module docstring)."""
        current = self.active(task)
        ref = VersionRef(task, (current.version if current else 0) + 1, sha256_of(data))
        self._call("put_object", Key=self._version_key(ref), Body=data, ContentType="application/octet-stream")
        return ref

    def activate(self, ref: VersionRef) -> None:
        """Move the pointer iff it still names the version `ref` was numbered after; then tidy up."""
        current, etag = self._pointer(ref.task)
        if current == ref:
            return
        expected = ref.version - 1
        if (current.version if current else 0) != expected:
            now = f"version {current.version}" if current else "no version"
            raise StoreConflict(
                f"task {ref.task!r} changed during this upload (now {now}, expected {expected or 'none'}); retry"
            )
        self._require_object(ref)
        body = json.dumps({"version": ref.version, "sha256": ref.sha256}).encode()
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        self._call(
            "put_object", Key=self._pointer_key(ref.task), Body=body, ContentType="application/json", **condition
        )
        keep = self._version_key(ref)
        self._after_commit(f"activate {ref.task!r} v{ref.version}", self._bump_epoch)
        self._after_commit(
            f"activate {ref.task!r} v{ref.version}", lambda: self._remove(self._versions_prefix(ref.task), keep)
        )

    def discard(self, ref: VersionRef) -> None:
        """Remove a version that never became active; a re-upload of the active bytes shares its key, so keep that."""
        current = self.active(ref.task)
        if current is not None and current.sha256 == ref.sha256:
            return
        self._call("delete_object", Key=self._version_key(ref))

    def delete(self, task: str) -> None:
        """Pointer first (the task is gone for every replica at once), then the epoch, then its objects."""
        if self.active(task) is None:
            raise UnknownTask(f"unknown task {task!r}")
        self._call("delete_object", Key=self._pointer_key(task))
        self._after_commit(f"delete {task!r}", self._bump_epoch)
        self._after_commit(f"delete {task!r}", lambda: self._remove(self._task_prefix(task)))

    def epoch(self) -> str:
        try:
            return self._get(self.prefix + EPOCH)[0].decode(errors="replace")
        except _Missing:
            return ""

    # ---- keys and objects --------------------------------------------------------------------
    def _task_prefix(self, task: str) -> str:
        return f"{self.prefix}{check_task_id(task)}/"

    def _pointer_key(self, task: str) -> str:
        return self._task_prefix(task) + ACTIVE

    def _versions_prefix(self, task: str) -> str:
        return self._task_prefix(task) + "versions/"

    def _version_key(self, ref: VersionRef) -> str:
        if not _SHA256.fullmatch(ref.sha256):
            raise StoreError(f"task {ref.task!r} version {ref.version}: malformed sha256 {ref.sha256!r}")
        return f"{self._versions_prefix(ref.task)}{ref.sha256}.safetensors"

    def _pointer(self, task: str) -> tuple[VersionRef | None, str | None]:
        """The task's active version and the pointer's ETag (for the conditional write); (None, None) if none."""
        key = self._pointer_key(task)
        try:
            body, etag = self._get(key)
        except _Missing:
            return None, None
        try:
            data = json.loads(body)
            ref = VersionRef(task, int(data["version"]), str(data["sha256"]))
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"task {task!r}: unreadable {ACTIVE} pointer ({e})") from e
        if ref.version < 1 or not _SHA256.fullmatch(ref.sha256):
            raise StoreError(f"task {task!r}: {ACTIVE} pointer names an invalid version {data!r}")
        return ref, etag

    def _require_object(self, ref: VersionRef) -> None:
        """A pointer must never name a missing object; a concurrent upload's tidy-up may have removed it."""
        try:
            self._call("head_object", Key=self._version_key(ref))
        except _Missing:
            raise StoreConflict(
                f"task {ref.task!r} version {ref.version}: its object was removed by a concurrent change; retry"
            ) from None

    def _remove(self, prefix: str, keep: str | None = None) -> None:
        """Delete every object under `prefix` except `keep` (listed first: deleting while paging skips keys)."""
        for key in list(self._keys(prefix)):
            if key != keep:
                self._call("delete_object", Key=key)

    def _bump_epoch(self) -> None:
        self._call("put_object", Key=self.prefix + EPOCH, Body=uuid.uuid4().hex.encode(), ContentType="text/plain")

    def _after_commit(self, what: str, step: Callable[[], None]) -> None:
        """Once the pointer has moved the change is committed: a later failure is logged, not raised."""
        try:
            step()
        except StoreError as e:
            log.warning("store: %s committed, but a follow-up step failed: %s", what, e)

    def _get(self, key: str) -> tuple[bytes, str]:
        response = self._call("get_object", Key=key)
        with response["Body"] as body:
            return body.read(), response["ETag"]

    def _keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"]
        except (ClientError, BotoCoreError) as e:
            raise self._error("list_objects_v2", prefix, e) from e

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 request; NoSuchKey becomes `_Missing`, every other failure a `StoreError` that names the cause."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            if _code(e) in _MISSING and operation in ("get_object", "head_object"):
                raise _Missing(kwargs["Key"]) from e
            raise self._error(operation, kwargs.get("Key", ""), e) from e
        except BotoCoreError as e:
            raise self._error(operation, kwargs.get("Key", ""), e) from e

    def _error(self, operation: str, key: str, e: Exception) -> StoreError:
        where = f"s3://{self.bucket}/{key}"
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None) or "the S3 endpoint"
        if isinstance(e, EndpointUnreachable):
            return StoreError(f"cannot reach {endpoint} ({operation} {where}): is the endpoint URL right and up?")
        if isinstance(e, NoCredentialsError):
            return StoreError("no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
        if not isinstance(e, ClientError):
            return StoreError(f"S3 {operation} {where} failed: {e}")
        code, message = _code(e), e.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return StoreError(f"S3 bucket {self.bucket!r} does not exist at {endpoint}; create it first")
        if code in _DENIED:
            return StoreError(f"access denied to {where} ({code}): check the credentials and the bucket policy")
        if code in _CONFLICT:
            return StoreConflict(f"{where} was changed by another writer during this request ({code}); retry")
        return StoreError(f"S3 {operation} {where} failed: {code}: {message}")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
