"""The local store: adapter versions on disk (the default).

Layout, one directory per task:

    <root>/<task>/v000003-<sha256[:16]>.safetensors   immutable version files
    <root>/<task>/ACTIVE                               {"version": 3, "sha256": "...", "file": "v000003-..."}
    <root>/EPOCH                                       rewritten after every pointer move (the change feed's poll)

Every write is temp file -> fsync -> rename -> fsync(dir), so a crash at any moment leaves the
previous ACTIVE pointer and its file intact. Once a new version is active the task's older version
files are removed, so a version file without a pointer to it is an orphan (an upload that did not
finish, or lost a race with another process); it is never served, and `check(repair=True)` removes it.
Symlinks are never followed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnknownTask
from .base import TASK_ID_RE, AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of

ACTIVE = "ACTIVE"
EPOCH = "EPOCH"
_VERSION_FILE = re.compile(r"^v(\d{6,})-([0-9a-f]{16})\.safetensors$")


FAULT_POINTS = ("version_temp_written", "version_renamed", "pointer_temp_written", "pointer_renamed")


@dataclass
class CheckReport:
    """What `kronserve store check` found: servable tasks, problems with active versions, orphaned files."""

    ok: list[str]
    problems: list[dict[str, str]]
    orphans: list[str]
    removed: list[str]

    @property
    def clean(self) -> bool:
        return not self.problems and len(self.orphans) == len(self.removed)


class LocalStore(AdapterStore):
    def __init__(self, root: str | Path, fault_point: str | None = None) -> None:
        """`fault_point` (tests only): SIGKILL this process at that moment of an upload, to prove crash safety."""
        if fault_point is not None and fault_point not in FAULT_POINTS:
            raise ValueError(f"fault_point must be one of {FAULT_POINTS}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fault_point = fault_point

    def tasks(self) -> list[str]:
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() or not entry.is_dir() or not TASK_ID_RE.fullmatch(entry.name):
                continue
            if self._pointer(entry.name).is_file() and not self._pointer(entry.name).is_symlink():
                out.append(entry.name)
        return out

    def active(self, task: str) -> VersionRef | None:
        pointer = self._pointer(task)
        if self._dir(task).is_symlink() or pointer.is_symlink() or not pointer.is_file():
            return None
        try:
            data = json.loads(_read_nofollow(pointer))
            ref = VersionRef(task, int(data["version"]), str(data["sha256"]))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise StoreError(f"task {task!r}: unreadable ACTIVE pointer ({e})") from e
        if data.get("file") != self._file_name(ref):
            raise StoreError(f"task {task!r}: ACTIVE pointer names {data.get('file')!r}, not {self._file_name(ref)!r}")
        return ref

    def read(self, ref: VersionRef) -> bytes:
        path = self._dir(ref.task) / self._file_name(ref)
        if path.parent.is_symlink():
            raise StoreConflict(f"the store's entry for task {ref.task!r} is a symlink; refusing to follow it")
        try:
            data = _read_nofollow(path)
        except OSError as e:
            raise StoreError(f"task {ref.task!r} version {ref.version}: cannot read {path.name} ({e})") from e
        if sha256_of(data) != ref.sha256:
            raise StoreError(f"task {ref.task!r} version {ref.version}: file content does not match its sha256")
        return data

    def write(self, task: str, data: bytes) -> VersionRef:
        d = self._dir(task)
        self._refuse_planted(task)
        d.mkdir(exist_ok=True)
        ref = VersionRef(task, self._next_version(task), sha256_of(data))
        _atomic_write(d / self._file_name(ref), data, lambda: self._fault("version_temp_written"))
        self._fault("version_renamed")
        return ref

    def _refuse_planted(self, task: str) -> None:
        """StoreConflict where the task's place holds what kronserve never writes: a symlinked directory, a
        non-directory, or an ACTIVE pointer that is a symlink or not a regular file (replacing it would hide it)."""
        d, pointer = self._dir(task), self._pointer(task)
        if d.is_symlink():
            raise StoreConflict(f"the store's entry for task {task!r} is a symlink; refusing to follow it")
        if d.exists() and not d.is_dir():
            raise StoreConflict(f"the store's entry for task {task!r} is not a directory; refusing to replace it")
        if pointer.is_symlink() or (pointer.exists() and not pointer.is_file()):
            raise StoreConflict(f"task {task!r}: its {ACTIVE} pointer is a symlink or not a file; refusing to touch it")

    def activate(self, ref: VersionRef) -> None:
        """Move the pointer, then drop the task's older version files (the bank holds what batches use).

        Only older ones: another process sharing the directory may be between writing a newer version and
        activating it, and its file must still be there when its pointer moves.
        """
        body = json.dumps({"version": ref.version, "sha256": ref.sha256, "file": self._file_name(ref)})
        _atomic_write(self._pointer(ref.task), body.encode(), lambda: self._fault("pointer_temp_written"))
        self._fault("pointer_renamed")
        self._bump_epoch()
        for old in self.versions(ref.task):
            if old.version < ref.version:
                self.discard(old)

    def discard(self, ref: VersionRef) -> None:
        """Remove exactly this version's file (another writer may hold the same number with other bytes)."""
        (self._dir(ref.task) / self._file_name(ref)).unlink(missing_ok=True)

    def check(self, repair: bool = False) -> CheckReport:
        """Verify every task's pointer and the hash of its active file; list (and with repair, remove) orphans.

        Orphans are what an interrupted upload leaves: temp files, version files no pointer names, task
        directories without a pointer, and symlinks (never followed, never served).
        """
        report = CheckReport([], [], [], [])
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() or entry.name.startswith(".tmp-"):
                self._orphan(report, entry, repair)
            elif entry.is_dir() and TASK_ID_RE.fullmatch(entry.name):
                self._check_task(entry.name, report, repair)
        return report

    def _check_task(self, task: str, report: CheckReport, repair: bool) -> None:
        try:
            ref = self.active(task)
            if ref is not None:
                self.read(ref)
        except StoreError as e:
            report.problems.append({"task": task, "problem": str(e)})
            return
        keep = self._file_name(ref) if ref else None
        for p in sorted(self._dir(task).iterdir()):
            if p.name not in (ACTIVE, keep) or p.is_symlink():
                self._orphan(report, p, repair)
        if ref is None:
            self._orphan(report, self._dir(task), repair)
        else:
            report.ok.append(task)

    @staticmethod
    def _orphan(report: CheckReport, path: Path, repair: bool) -> None:
        report.orphans.append(str(path))
        if repair:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            report.removed.append(str(path))

    def _fault(self, point: str) -> None:
        if point == self.fault_point:
            os.kill(os.getpid(), signal.SIGKILL)

    def delete(self, task: str) -> None:
        d = self._dir(task)
        if d.is_symlink() or not self._pointer(task).is_file():
            raise UnknownTask(f"unknown task {task!r}")
        self._pointer(task).unlink()
        _fsync_dir(d)
        self._bump_epoch()
        shutil.rmtree(d, ignore_errors=True)

    def epoch(self) -> str:
        try:
            return _read_nofollow(self.root / EPOCH).decode()
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise StoreError(f"cannot read the store's {EPOCH} ({e})") from e

    def _bump_epoch(self) -> None:
        _atomic_write(self.root / EPOCH, uuid.uuid4().hex.encode())

    def versions(self, task: str) -> list[VersionRef]:
        """Every version file of the task, active or orphaned."""
        d = self._dir(task)
        if d.is_symlink() or not d.is_dir():
            return []
        refs = []
        for p in d.iterdir():
            m = _VERSION_FILE.fullmatch(p.name)
            if m and not p.is_symlink():
                refs.append(VersionRef(task, int(m.group(1)), m.group(2)))
        return sorted(refs, key=lambda r: r.version)

    def _next_version(self, task: str) -> int:
        return max((r.version for r in self.versions(task)), default=0) + 1

    def _dir(self, task: str) -> Path:
        return self.root / check_task_id(task)

    def _pointer(self, task: str) -> Path:
        return self._dir(task) / ACTIVE

    @staticmethod
    def _file_name(ref: VersionRef) -> str:
        return f"v{ref.version:06d}-{ref.sha256[:16]}.safetensors"


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _atomic_write(path: Path, data: bytes, before_rename: Callable[[], None] = lambda: None) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
