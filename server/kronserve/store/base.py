"""The store interface: what the registry needs from durable storage, and what every store shares.

A store holds immutable versions per task and one atomically moved pointer per task naming the
active one. `epoch()` changes whenever any pointer moves, so replicas that poll it (the cluster's
change feed of last resort) rescan only when something changed.

Every change has one commit point (the pointer's move, or its removal). A method raises only if the
change did not happen; what follows the commit (the epoch, removing replaced files) is best-effort,
so a caller that got an error may tell its client "nothing changed", and one that did not, "done".
Storage failures of any kind (I/O, permissions, an unreachable endpoint) are `StoreError`.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import TASK_ID_PATTERN
from ..errors import InvalidRequest, KronserveError

TASK_ID_RE = re.compile(TASK_ID_PATTERN)


class StoreError(KronserveError):
    """The store cannot do what was asked (unreachable, unreadable, corrupt): 503, the operator's problem."""

    code = "store_error"


class StoreConflict(StoreError):
    """409: the store holds something at the task's place that kronserve will not touch (a planted symlink),
    or another writer moved the task's pointer first (S3's conditional write)."""

    code = "store_conflict"


@dataclass(frozen=True)
class VersionRef:
    task: str
    version: int
    sha256: str


def check_task_id(task: str) -> str:
    if not isinstance(task, str) or not TASK_ID_RE.fullmatch(task):
        raise InvalidRequest(f"invalid task id {task!r}: expected {TASK_ID_PATTERN}")
    return task


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AdapterStore(ABC):
    """What the registry needs from durable storage; nothing above it touches paths or buckets."""

    parallel_reads: int = 1  # concurrent reads worth making at start-up (a network store answers faster so)

    @abstractmethod
    def tasks(self) -> list[str]:
        """Tasks that have an active version."""

    @abstractmethod
    def active(self, task: str) -> VersionRef | None: ...

    @abstractmethod
    def read(self, ref: VersionRef) -> bytes:
        """The version's bytes, verified against its sha256."""

    def refs(self) -> Iterator[tuple[str, VersionRef | StoreError]]:
        """Every task with an active version, and its ref (or why its pointer cannot be read): what start-up
        registers. This default asks `active` per task."""
        for task in self.tasks():
            try:
                ref = self.active(task)
            except StoreError as e:
                yield task, e
                continue
            if ref is not None:
                yield task, ref

    def size(self, ref: VersionRef) -> int | None:
        """The version file's size if it can be had cheaply (a start-up snapshot checks it); None: unknown."""
        return None

    def head(self, ref: VersionRef, limit: int) -> tuple[bytes, int]:
        """The version's first bytes (at least its safetensors header, when it is at most `limit` bytes) and the
        file's size: what registering a stored version reads. This default reads the whole file."""
        data = self.read(ref)
        return data, len(data)

    @abstractmethod
    def write(self, task: str, data: bytes) -> VersionRef:
        """Store a new immutable version (not active yet)."""

    @abstractmethod
    def activate(self, ref: VersionRef) -> None:
        """Make `ref` the task's active version, atomically, and move the epoch; raises only if the pointer
        did not move."""

    @abstractmethod
    def discard(self, ref: VersionRef) -> None:
        """Remove a version that never became active (never the one the pointer names)."""

    @abstractmethod
    def delete(self, task: str) -> None:
        """Remove the task: its pointer first (atomic), then its files; moves the epoch. Raises only if the
        task is still there."""

    @abstractmethod
    def epoch(self) -> str:
        """An opaque token that differs after any activate or delete ("" for a store never written)."""
