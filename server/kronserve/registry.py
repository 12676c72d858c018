"""Task id -> active version; the catalogue of registered tasks, and where each version's weights are.

Registration is separate from residency. A registered version is an `Entry` (identity and spec, no
weights); its packed weights live in the host tier (compact, LRU) when used or just uploaded, and in the
device tier while batches read them. Start-up indexes the store from each version's header alone, so a
server over 100,000 stored adapters is ready in seconds; a task's first request reads and validates its
file (`fetch`).

Upload = validate -> write the version file (not active yet) -> move the store's ACTIVE pointer -> swap
the task's entry (one assignment under a lock). Moving the pointer is the commit point: a failure before
it undoes the earlier steps, so the old version keeps serving and no file is left behind; the store never
raises after it (see store/local.py). A request leases its entry at acceptance, so it finishes on the
version it started with; a replaced or deleted version leaves the tiers when its last lease ends. The store
removes that version's file at once, so its weights are kept in memory from just before (`_before_removal`)
until then: a request never reads a file that is gone.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from .backbone import Fingerprint
from .compact import Compact, compact
from .device_tier import DeviceTier
from .errors import BackboneMismatch, BankFull, KronserveError, UnknownTask
from .formats import native
from .formats.native import AdapterFile
from .host_tier import HostTier
from .methods import MethodSpec
from .metrics import Metrics
from .store import AdapterStore, StoreError, VersionRef, check_task_id, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One registered version of a task. Identity = task + version + sha256 of its file."""

    task: str
    version: int
    sha256: str
    spec: MethodSpec
    params: int
    base_model: str | None = None  # the training backbone the adapter's source declared (native metadata)
    serial: int = 0  # which registration: two with one version and hash (a storeless reload) are still two

    @property
    def key(self) -> tuple[str, int, str, int]:
        """What the tiers know a version by."""
        return (self.task, self.version, self.sha256, self.serial)

    def describe(self) -> dict[str, object]:
        return {
            "task": self.task,
            "version": self.version,
            "method": self.spec.method,
            "params": self.params,
            "sha256": self.sha256,
            "spec": self.spec.model_dump(),
            "base_model": self.base_model,
        }


class Snapshot:
    """The start-up index as a file: task -> [version, sha256, size, spec, base_model] for one backbone, with each
    distinct spec's JSON written once (`specs`) and named by its index.

    Only a cache: an entry is used when the store's pointer still names that version and the file still has that
    size (versions are immutable files), and a missing, foreign or unreadable snapshot is simply ignored."""

    FORMAT = "kronserve-index-1"

    @staticmethod
    def read(path: Path, fingerprint: Fingerprint) -> dict[str, list]:
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != Snapshot.FORMAT or data.get("backbone") != fingerprint.digest:
                return {}
            specs = data["specs"]
            return {
                t: [*e[:3], specs[e[3]], e[4]] for t, e in data["tasks"].items() if isinstance(e, list) and len(e) == 5
            }
        except (OSError, ValueError, KeyError, AttributeError, TypeError, IndexError):
            return {}

    @staticmethod
    def write(path: Path, fingerprint: Fingerprint, entries: list[Entry], sizes: dict[str, int]) -> None:
        """Atomically (rename); a failure is logged, never raised: the next start reads headers again."""
        index: dict[int, int] = {}  # specs are shared objects: each distinct one is written out once
        specs: list[str] = []
        tasks = {}
        for e in entries:
            if e.task in sizes:
                if id(e.spec) not in index:
                    index[id(e.spec)] = len(specs)
                    specs.append(e.spec.model_dump_json())
                tasks[e.task] = [e.version, e.sha256, sizes[e.task], index[id(e.spec)], e.base_model]
        body = json.dumps({"format": Snapshot.FORMAT, "backbone": fingerprint.digest, "specs": specs, "tasks": tasks})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write the start-up index %s: %s", path, e)


class Registry:
    def __init__(
        self,
        device: DeviceTier,
        host: HostTier,
        fingerprint: Fingerprint,
        store: AdapterStore | None = None,
        metrics: Metrics | None = None,
        max_tasks: int = 1_000_000,
    ) -> None:
        self.device, self.host, self.fingerprint, self.store = device, host, fingerprint, store
        self.metrics = metrics or Metrics()
        self.max_tasks = max_tasks
        self._lock = threading.Lock()  # guards the maps below; held only briefly
        self._mutate = threading.Lock()  # serializes uploads, deletes and refreshes
        self._active: dict[str, Entry] = {}
        self._unavailable: dict[str, str] = {}  # task -> why its active version in the store could not be loaded
        self._refs: Counter[tuple] = Counter()
        self._retired: set[tuple] = set()
        # Weights of versions whose store file is being removed (replaced or deleted), kept in memory until their
        # last lease ends: a request that leased one finishes on it even when the host tier has evicted it.
        self._kept: dict[tuple, Compact] = {}
        self._last_used: dict[str, float] = {}
        self._started = time.monotonic()
        self._serials = itertools.count()
        self._sizes: dict[str, int] = {}  # task -> its indexed file's size (for the start-up snapshot)
        self.on_new_version: Callable[[Entry], None] | None = None  # the engine reloads pinned tasks' new versions
        # Around each upload (task, its spec, pin it too): the engine refuses and reserves pins' device room there.
        self.on_upload: Callable[[str, MethodSpec, bool], AbstractContextManager[None]] = _no_check
        self.on_drop: Callable[[tuple], None] = device.drop  # the engine routes it to the thread owning the device
        self.serving: str | None = None  # the backbone's name as the server was given it (for mismatch errors)

    # ---- reads -------------------------------------------------------------------------------
    def get(self, task: str) -> Entry:
        entry = self._active.get(task)
        if entry is None:
            raise self._missing(task)
        return entry

    def unavailable(self) -> dict[str, str]:
        """Tasks the store holds whose active version could not be loaded, and why (for /readyz)."""
        return dict(self._unavailable)

    def _missing(self, task: str) -> KronserveError:
        """404 for a task the store does not hold; 503 for one it holds but whose file could not be loaded."""
        why = self._unavailable.get(task)
        if why is not None:
            return StoreError(f"task {task!r} is in the store but its active version cannot be loaded: {why}")
        return UnknownTask(f"unknown task {task!r}")

    def peek(self, task: str) -> Entry | None:
        return self._active.get(task)

    def entries(self) -> list[Entry]:
        return sorted(self._active.values(), key=lambda e: e.task)

    def page(self, after: str | None, limit: int) -> tuple[list[Entry], str | None]:
        """Up to `limit` entries in task order after `after`, and the cursor of the next page (None: last)."""
        tasks = sorted(t for t in self._active if after is None or t > after)
        page = [e for t in tasks[:limit] if (e := self._active.get(t)) is not None]
        return page, (page[-1].task if len(tasks) > limit and page else None)

    def count(self) -> int:
        return len(self._active)

    def tier(self, entry: Entry) -> str:
        """Where the version's weights are now: device, host, or only in the store."""
        if self.device.resident(entry.key) is not None:
            return "device"
        return "host" if self.host.peek(entry.key) is not None else "store"

    @contextmanager
    def lease(self, tasks: Sequence[str | None]) -> Iterator[list[Entry | None]]:
        """Resolve every task (None = bare backbone) and hold their versions until the block ends."""
        entries = self.acquire(tasks)
        try:
            yield entries
        finally:
            self.release(entries)

    def acquire(self, tasks: Sequence[str | None]) -> list[Entry | None]:
        """Resolve and hold each task's active version; raises UnknownTask (holding nothing) for an unknown one.

        A request acquires when it is accepted, so a later swap or delete cannot change or drop the version
        it is answered with; `release` must follow.
        """
        with self._lock:
            entries = [None if t is None else self._active.get(t) for t in tasks]
            for t, e in zip(tasks, entries, strict=True):
                if t is not None and e is None:
                    raise self._missing(t)
            self._refs.update(e.key for e in entries if e is not None)
            now = time.monotonic()
            self._last_used.update((t, now) for t in tasks if t is not None)
        return entries

    def release(self, entries: Sequence[Entry | None]) -> None:
        keys = [e.key for e in entries if e is not None]
        with self._lock:
            self._refs.subtract(keys)
            gone = []
            for k in set(keys):
                if self._refs[k] <= 0:
                    del self._refs[k]
                    if k in self._retired:
                        self._retired.discard(k)
                        gone.append(k)
        for k in gone:
            self._forget(k)
        self.update_gauges()

    def fetch(self, entry: Entry) -> Compact:
        """The version's packed weights: from the host tier, or read from the store and validated (a host miss).

        A file that cannot be loaded makes its task unavailable (503 with the reason) until it is replaced.
        """
        kept = self._kept.get(entry.key)
        if kept is not None:
            return kept
        return self.host.get(entry.key, lambda: self._load(entry))

    def _load(self, entry: Entry) -> Compact:
        if self.store is None:
            raise StoreError(f"task {entry.task!r} version {entry.version}: its weights are no longer in memory")
        started = time.perf_counter()
        try:
            packed = self._read(entry)
        except KronserveError as e:
            self.metrics.adapter_load_failures.labels("store", e.code).inc()
            with self._lock:
                if self._active.get(entry.task) == entry:
                    self._unavailable[entry.task] = f"{e.code}: {e}"
            self.update_gauges()
            raise self._missing(entry.task) if entry.task in self._unavailable else e from e
        self.metrics.adapter_loads.labels("store").inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return packed

    def _read(self, entry: Entry) -> Compact:
        assert self.store is not None
        ref = VersionRef(entry.task, entry.version, entry.sha256)
        return compact(native.loads(self.store.read(ref), self.fingerprint), self.device.dtype)

    # ---- writes ------------------------------------------------------------------------------
    def install(self, adapter: AdapterFile, version: int, sha256: str) -> Entry:
        """Serve a validated adapter as the task's active version (no store: tests, benchmarks, the trainer)."""
        packed = compact(adapter, self.device.dtype)
        self._check_room(adapter.task)
        return self._swap(adapter, version, sha256, packed)

    def upload(self, task: str, data: bytes, pin: bool = False) -> Entry:
        """Validate, persist and serve `data` as `task`'s new version (and pin the task, with `pin`); on any failure
        nothing changes."""
        check_task_id(task)
        started = time.perf_counter()
        try:
            adapter = replace(native.loads(data, self.fingerprint), task=task)
            packed = compact(adapter, self.device.dtype)
            with self._mutate, self.on_upload(task, adapter.spec, pin):
                entry = self._persist(adapter, data, packed)
        except KronserveError as e:
            self.metrics.adapter_load_failures.labels("upload", e.code).inc()
            if isinstance(e, BackboneMismatch) and self.serving is not None:
                raise BackboneMismatch(f"{e}; this server runs {self.serving!r}") from None
            raise
        self.metrics.adapter_loads.labels("upload").inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return entry

    def delete(self, task: str) -> Entry | None:
        """Delete from the store, then stop serving; a task whose stored version cannot load is deletable too."""
        check_task_id(task)
        with self._mutate:
            entry = self._active.get(task)
            if entry is None and task not in self._unavailable:
                raise UnknownTask(f"unknown task {task!r}")
            if self.store is not None:
                self._before_removal(entry, lambda: self.store.delete(task))
            with self._lock:
                self._unavailable.pop(task, None)
                if entry is not None:
                    del self._active[task]
                    self._last_used.pop(task, None)
            if entry is not None:
                self._retire(entry.key)
        self.update_gauges()
        return entry

    def evict(self, task: str) -> Entry | None:
        """Stop serving `task` here, leaving the store alone: a cluster replica drops its copy of a task
        another replica owns once it is idle. Requests holding it finish first."""
        with self._mutate:
            with self._lock:
                entry = self._active.pop(task, None)
                if entry is not None:
                    self._last_used.pop(task, None)
            if entry is not None:
                self._retire(entry.key)
        self.update_gauges()
        return entry

    def idle_s(self, task: str) -> float:
        """Seconds since a request last took `task` (since start-up if none has)."""
        return time.monotonic() - self._last_used.get(task, self._started)

    def load_store(self, select: Callable[[str], bool] | None = None, snapshot: Path | None = None) -> list[str]:
        """Register every active version in the store (or those `select` picks) from its header alone: no
        weights are read until a request needs them. A header that cannot be read or does not fit this
        backbone makes the task unavailable (logged, counted).

        With `snapshot` (a file of this process's cache), a version found there under the same pointer (version
        and sha256: its file is immutable) and the same file size is registered from it without reading its
        header; the snapshot is rewritten afterwards. A restart over 100,000 unchanged versions then reads their
        pointers and sizes only."""
        if self.store is None:
            return []
        refs = [(t, ref) for t, ref in self.store.refs() if select is None or select(t)]
        known = Snapshot.read(snapshot, self.fingerprint) if snapshot is not None else {}
        index = functools.partial(self._index_one, known=known)
        if self.store.parallel_reads > 1:
            with ThreadPoolExecutor(self.store.parallel_reads) as pool:
                found = list(pool.map(lambda item: index(*item), refs))
        else:  # a local disk: the work is parsing, and threads would only fight over the GIL
            found = [index(t, ref) for t, ref in refs]
        self.update_gauges()
        if snapshot is not None:
            Snapshot.write(snapshot, self.fingerprint, list(self._active.values()), self._sizes)
        return [t for (t, _), ok in zip(refs, found, strict=True) if ok]

    def _index_one(self, task: str, ref: VersionRef | StoreError, known: dict[str, list] | None = None) -> bool:
        """Register `task` from the snapshot or its header (start-up, before any request: no `_mutate`, so headers
        may be read in parallel)."""
        assert self.store is not None
        try:
            if isinstance(ref, StoreError):
                raise ref
            hit = (known or {}).get(task)
            if hit is not None and (hit[0], hit[1]) == (ref.version, ref.sha256):
                size = self.store.size(ref)
                if size is not None and size == hit[2]:
                    spec = native.spec_from_text(hit[3])
                    self._register(task, ref.version, ref.sha256, spec, hit[4], None, gauges=False)
                    self._sizes[task] = size
                    return True
            head, size = self.store.head(ref, native.header_limit(self.fingerprint.geometry))
            spec, base, described = native.loads_header(head, self.fingerprint)
            if described != size:
                raise StoreError(
                    f"task {task!r} version {ref.version}: the file is {size} bytes, its header describes "
                    f"{described}: it is damaged"
                )
            self._register(task, ref.version, ref.sha256, spec, base, None, gauges=False)
            self._sizes[task] = size
            return True
        except KronserveError as e:
            self.metrics.adapter_load_failures.labels("store", e.code).inc()
            with self._lock:
                self._unavailable[task] = f"{e.code}: {e}"
            log.error("store: skipping task %r: %s", task, e)
            return False

    def refresh(self, task: str) -> Entry | None:
        """Make the served version of `task` the store's active one (also one uploaded elsewhere), reading and
        validating its file now."""
        assert self.store is not None
        with self._mutate:
            ref = self.store.active(task)
            current = self._active.get(task)
            if ref is None:
                with self._lock:
                    self._unavailable.pop(task, None)
                    self._active.pop(task, None)
                if current is not None:
                    self._retire(current.key)
                self.update_gauges()
                return None
            if current is not None and (current.version, current.sha256) == (ref.version, ref.sha256):
                return current
            started = time.perf_counter()
            adapter = replace(native.loads(self.store.read(ref), self.fingerprint), task=task)
            entry = self._swap(adapter, ref.version, ref.sha256, compact(adapter, self.device.dtype))
        self.metrics.adapter_loads.labels("store").inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return entry

    def _persist(self, adapter: AdapterFile, data: bytes, packed: Compact) -> Entry:
        self._check_room(adapter.task)
        if self.store is None:
            current = self._active.get(adapter.task)
            return self._swap(adapter, (current.version if current else 0) + 1, sha256_of(data), packed)
        ref = self.store.write(adapter.task, data)  # raises with nothing written
        try:
            self._before_removal(self._active.get(adapter.task), lambda: self._activate(ref))
        except BaseException:
            self._discard(ref)
            raise
        return self._swap(adapter, ref.version, ref.sha256, packed)

    def _before_removal(self, entry: Entry | None, remove: Callable[[], None]) -> None:
        """Run `remove` (a store change that removes `entry`'s file) with the version's weights kept in memory, so
        requests that leased it (or lease it until the registry swaps) finish on it; `_forget` lets them go.

        Kept whether leased or not: a request may lease it between this check and the swap. The read is one small
        file, and only for a version the host tier no longer holds; one that cannot be read is not kept (its
        requests fail as they would have)."""
        if entry is None:
            remove()
            return
        packed = self.host.peek(entry.key)
        if packed is None:
            try:
                packed = self._read(entry)
            except KronserveError as e:
                log.warning("store: %s v%d cannot be kept for requests in flight: %s", entry.task, entry.version, e)
        if packed is not None:
            self._kept[entry.key] = packed
        try:
            remove()
        except BaseException:
            self._kept.pop(entry.key, None)
            raise

    def _check_room(self, task: str) -> None:
        if task not in self._active and len(self._active) >= self.max_tasks:
            raise BankFull(f"this server registers at most {self.max_tasks} tasks (max_adapters); delete one first")

    def _activate(self, ref: VersionRef) -> None:
        """Move the store's pointer (it raises only if the pointer did not move). If it raised yet the pointer names
        `ref` (S3's answer lost on the way back), the change is made: carry on, so the client hears what is stored."""
        assert self.store is not None
        try:
            self.store.activate(ref)
        except StoreError:
            try:
                landed = self.store.active(ref.task) == ref
            except StoreError:
                landed = False
            if not landed:
                raise
            log.warning("store: moving %s's pointer to v%d reported an error, but it moved", ref.task, ref.version)

    def _discard(self, ref: VersionRef) -> None:
        """Remove a version that never became active; failing to is an orphan for `store check`, not a new error
        that would hide the one the client must see."""
        assert self.store is not None
        try:
            self.store.discard(ref)
        except KronserveError as e:
            log.warning("store: could not remove unactivated %s v%d: %s", ref.task, ref.version, e)

    def _swap(self, adapter: AdapterFile, version: int, sha256: str, packed: Compact) -> Entry:
        return self._register(adapter.task, version, sha256, adapter.spec, adapter.base_model, packed)

    def _register(
        self,
        task: str,
        version: int,
        sha256: str,
        spec: MethodSpec,
        base: str | None,
        packed: Compact | None,
        gauges: bool = True,
    ) -> Entry:
        params = spec.param_count(self.fingerprint.geometry)
        entry = Entry(task, version, sha256, spec, params, base, next(self._serials))
        if packed is not None:
            self.host.put(entry.key, packed)
        with self._lock:
            old = self._active.get(task)
            self._active[task] = entry
            self._unavailable.pop(task, None)
        if old is not None and old.key != entry.key:
            self._retire(old.key)
        if gauges:
            self.update_gauges()
        if self.on_new_version is not None:
            self.on_new_version(entry)
        return entry

    # ---- leaving the tiers ---------------------------------------------------------------------
    def _retire(self, key: tuple) -> None:
        """A version no longer active: it leaves the tiers now if no request holds it, else when the last ends."""
        with self._lock:
            held = self._refs[key] > 0
            if held:
                self._retired.add(key)
        if not held:
            self._forget(key)

    def _forget(self, key: tuple) -> None:
        self._kept.pop(key, None)
        self.host.drop(key)
        self.on_drop(key)

    def resident(self) -> int:
        """Versions held in memory, host or device (active and draining)."""
        host = self.host.keys()
        return len(host) + sum(1 for k in self.device.versions() if k not in host)

    def update_gauges(self) -> None:
        self.metrics.adapters_active.set(len(self._active))
        self.metrics.adapters_unavailable.set(len(self._unavailable))
        self.metrics.adapters_resident.set(self.resident())


def _no_check(task: str, spec: MethodSpec, pin: bool) -> AbstractContextManager[None]:
    return nullcontext()
