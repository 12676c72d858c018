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

A failing disk or directory (any OSError) is a `StoreError`, and every operation has one commit point:
moving ACTIVE (upload) or renaming the task's directory away (delete). A failure before it leaves the
old state and raises; once it has happened the change stands and what follows (EPOCH, which is only a
hint for pollers, and removing replaced files) is best-effort: logged, never raised, never undone. So
the caller's answer always says which state the store is in, and nothing the pointer names is removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnknownTask
from .base import TASK_ID_RE, AdapterStore, StoreConflict, StoreError, VersionRef, check_task_id, sha256_of

log = logging.getLogger(__name__)

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
        with _os_errors(f"cannot list the store {self.root}"):
            entries = sorted(self.root.iterdir())
            for entry in entries:
                if entry.is_symlink() or not entry.is_dir() or not TASK_ID_RE.fullmatch(entry.name):
                    continue
                if self._pointer(entry.name).is_file() and not self._pointer(entry.name).is_symlink():
                    out.append(entry.name)
        return out

    def refs(self) -> Iterator[tuple[str, VersionRef | StoreError]]:
        """One directory scan; per task one open of its pointer (O_NOFOLLOW: a planted link is skipped, as
        `tasks` skips it), so 100,000 tasks cost 100,000 small reads and no other system call."""
        with _os_errors(f"cannot list the store {self.root}"):
            entries = sorted((e for e in os.scandir(self.root) if TASK_ID_RE.fullmatch(e.name)), key=lambda e: e.name)
        for entry in entries:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                data = _read_nofollow(os.path.join(entry.path, ACTIVE))  # strings: pathlib costs 100,000 x 10 us
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:  # the pointer is a symlink: never followed
                    continue
                yield entry.name, StoreError(f"task {entry.name!r}: unreadable ACTIVE pointer ({e})")
                continue
            try:
                yield entry.name, self._parse_pointer(entry.name, data)
            except StoreError as e:
                yield entry.name, e

    def active(self, task: str) -> VersionRef | None:
        pointer = self._pointer(task)
        with _os_errors(f"task {task!r}: cannot look up its {ACTIVE} pointer"):
            if self._dir(task).is_symlink() or pointer.is_symlink() or not pointer.is_file():
                return None
        try:
            data = _read_nofollow(pointer)
        except OSError as e:
            raise StoreError(f"task {task!r}: unreadable ACTIVE pointer ({e})") from e
        return self._parse_pointer(task, data)

    def _parse_pointer(self, task: str, raw: bytes) -> VersionRef:
        try:
            data = json.loads(raw)
            ref = VersionRef(task, int(data["version"]), str(data["sha256"]))
        except (ValueError, KeyError, TypeError) as e:
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

    def size(self, ref: VersionRef) -> int | None:
        path = os.path.join(self.root, check_task_id(ref.task), self._file_name(ref))
        try:
            return os.stat(path, follow_symlinks=False).st_size
        except OSError:
            return None

    def head(self, ref: VersionRef, limit: int) -> tuple[bytes, int]:
        """Reads the header only (8-byte length + JSON): start-up over 100,000 versions reads KB, not GB. The task
        directory is opened without following a link (O_NOFOLLOW | O_DIRECTORY), then the file within it."""
        path = self._dir(ref.task) / self._file_name(ref)
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreConflict(
                    f"the store's entry for task {ref.task!r} is a symlink; refusing to follow it"
                ) from None
            raise StoreError(f"task {ref.task!r} version {ref.version}: cannot read {path.name} ({e})") from e
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                first = f.read(8)
                n = int.from_bytes(first, "little") if len(first) == 8 else 0
                head = first + f.read(min(n, limit))
        except OSError as e:
            raise StoreError(f"task {ref.task!r} version {ref.version}: cannot read {path.name} ({e})") from e
        finally:
            os.close(parent)
        if len(first) < 8 or (n <= limit and len(head) < 8 + n):
            raise StoreError(f"task {ref.task!r} version {ref.version}: {path.name} is cut short ({size} bytes)")
        return head, size

    def write(self, task: str, data: bytes) -> VersionRef:
        """Store the file (not active yet); on failure nothing is left, not even the task directory it made."""
        d = self._dir(task)
        with _os_errors(f"task {task!r}: cannot write a new version"):
            self._refuse_planted(task)
            d.mkdir(exist_ok=True)
        try:
            with _os_errors(f"task {task!r}: cannot write a new version"):
                ref = VersionRef(task, self._next_version(task), sha256_of(data))
                _atomic_write(d / self._file_name(ref), data, lambda: self._fault("version_temp_written"))
        except StoreError:
            self._remove_if_unused(task)
            raise
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
        """Move the pointer, then drop the task's older version files (the tiers hold what batches use).

        Only older ones: another process sharing the directory may be between writing a newer version and
        activating it, and its file must still be there when its pointer moves. Raises (StoreError) only if
        the pointer did not move; once it has moved, nothing is raised or undone.
        """
        body = json.dumps({"version": ref.version, "sha256": ref.sha256, "file": self._file_name(ref)})
        with _os_errors(f"task {ref.task!r}: cannot move its {ACTIVE} pointer to version {ref.version}"):
            _atomic_write(self._pointer(ref.task), body.encode(), lambda: self._fault("pointer_temp_written"))
        self._fault("pointer_renamed")
        what = f"task {ref.task!r} version {ref.version} is active"
        _after_commit(what, self._bump_epoch)
        for old in self.versions(ref.task):
            if old.version < ref.version:
                _after_commit(what, lambda old=old: self.discard(old))

    def discard(self, ref: VersionRef) -> None:
        """Remove exactly this version's file (another writer may hold the same number with other bytes), never
        the one the pointer names; then the task's directory, if that leaves it empty."""
        with _os_errors(f"task {ref.task!r}: cannot remove version {ref.version}"):
            if self._names(ref):
                return
            (self._dir(ref.task) / self._file_name(ref)).unlink(missing_ok=True)
        self._remove_if_unused(ref.task)

    def _names(self, ref: VersionRef) -> bool:
        """Whether the task's pointer names `ref` (an unreadable pointer counts as naming it: keep the file)."""
        try:
            return self.active(ref.task) == ref
        except StoreError:
            return True

    def _remove_if_unused(self, task: str) -> None:
        """Remove the task's directory if it is empty (a refused first upload must leave no trace). Another
        process may have made it a moment ago for its own upload; rmdir only ever removes an empty one."""
        d = self._dir(task)
        if not d.is_symlink():
            with suppress(OSError):  # not empty, gone already, or not ours to remove: all fine
                d.rmdir()

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
        """Commit point: the task's directory renamed away (one atomic step) with its pointer removed inside.

        If either step fails the directory is renamed back and StoreError says nothing changed; after it,
        EPOCH and removing the renamed directory are best-effort (a leftover `.tmp-` entry is an orphan).
        """
        d, pointer = self._dir(task), self._pointer(task)
        with _os_errors(f"cannot delete task {task!r}"):
            if d.is_symlink() or not pointer.is_file():
                raise UnknownTask(f"unknown task {task!r}")
        gone = self.root / f".tmp-{uuid.uuid4().hex}-deleted-{task}"
        with _os_errors(f"cannot delete task {task!r}"):
            os.rename(d, gone)
        try:
            with _os_errors(f"cannot delete task {task!r}"):
                (gone / ACTIVE).unlink()
        except StoreError:
            self._undo_rename(gone, d)
            raise
        what = f"task {task!r} is deleted"
        _after_commit(what, lambda: _fsync_dir(self.root))
        _after_commit(what, self._bump_epoch)
        _after_commit(what, lambda: shutil.rmtree(gone))

    @staticmethod
    def _undo_rename(gone: Path, d: Path) -> None:
        try:
            os.rename(gone, d)
        except OSError as e:  # the task is gone from the store after all; its pointer is an orphan in `gone`
            log.error("store: could not restore %s after a failed delete (%s); it is deleted", d, e)

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


def _read_nofollow(path: Path | str) -> bytes:
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
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _after_commit(f"{path} is written", lambda: _fsync_dir(path.parent))


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """An OSError (a full disk, a read-only or immutable directory, a permission) as a StoreError: 503, retry."""
    try:
        yield
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise StoreError(f"{what} ({e.strerror or e}{where})") from e


def _after_commit(what: str, step: Callable[[], object]) -> None:
    """A step after the commit point: the change stands whatever happens here, so a failure is logged, not raised."""
    try:
        step()
    except (OSError, StoreError) as e:
        log.warning("store: %s, but a follow-up step failed: %s", what, e)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
