"""Task id -> active version -> bank slot; the only place that decides when a slot is free.

Upload = validate -> write the version file (not active yet) -> load it into a fresh slot -> move
the store's ACTIVE pointer -> swap the task's entry (one assignment under a lock). Moving the pointer
is the commit point: a failure before it undoes the earlier steps, so the old version keeps serving
and no file is left behind; the store never raises after it (see store/local.py). A batch
leases the entries it resolved, so it finishes on the versions it started with; a replaced or
deleted version's slot is cleared only when its last lease ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from .backbone import Fingerprint
from .bank import AdapterBank
from .errors import BankFull, KronserveError, UnknownTask
from .formats import native
from .formats.native import AdapterFile
from .methods import MethodSpec
from .metrics import Metrics
from .plan import BARE
from .store import AdapterStore, StoreError, VersionRef, check_task_id, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One loaded version of a task. Identity = task + version + sha256 of its file."""

    task: str
    version: int
    sha256: str
    slot: int
    spec: MethodSpec
    params: int
    base_model: str | None = None  # the training backbone the adapter's source declared (native metadata)

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


class Registry:
    def __init__(
        self,
        bank: AdapterBank,
        fingerprint: Fingerprint,
        store: AdapterStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.bank, self.fingerprint, self.store = bank, fingerprint, store
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()  # guards the maps below; held only briefly
        self._mutate = threading.Lock()  # serializes uploads, deletes and refreshes
        self._active: dict[str, Entry] = {}
        self._unavailable: dict[str, str] = {}  # task -> why its active version in the store could not be loaded
        self._refs: Counter[int] = Counter()
        self._retired: set[int] = set()
        self._free: list[int] = []
        self._next_slot = 0
        self._last_used: dict[str, float] = {}
        self._started = time.monotonic()

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

    @contextmanager
    def lease(self, tasks: Sequence[str | None]) -> Iterator[list[Entry | None]]:
        """Resolve every task (None = bare backbone) and hold their slots until the block ends."""
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
            self._refs.update(e.slot for e in entries if e is not None)
            now = time.monotonic()
            self._last_used.update((t, now) for t in tasks if t is not None)
        return entries

    def release(self, entries: Sequence[Entry | None]) -> None:
        slots = [e.slot for e in entries if e is not None]
        with self._lock:
            self._refs.subtract(slots)
            for s in set(slots):
                if self._refs[s] <= 0:
                    del self._refs[s]
                    if s in self._retired:
                        self._retired.discard(s)
                        self._free_slot(s)
        self._update_gauges()

    @staticmethod
    def slots_of(entries: Sequence[Entry | None]) -> list[int]:
        return [BARE if e is None else e.slot for e in entries]

    # ---- writes ------------------------------------------------------------------------------
    def install(self, adapter: AdapterFile, version: int, sha256: str) -> Entry:
        """Load a validated adapter into a fresh slot and make it the task's active version."""
        slot = self._allocate(adapter.task)
        try:
            self.bank.write(slot, adapter)
        except BaseException:
            self._return_unused(slot)
            raise
        return self._swap(adapter, version, sha256, slot)

    def upload(self, task: str, data: bytes) -> Entry:
        """Validate, persist and serve `data` as `task`'s new version; on any failure nothing changes."""
        check_task_id(task)
        started = time.perf_counter()
        try:
            adapter = native.loads(data, self.fingerprint)
            adapter = replace(adapter, task=task)
            with self._mutate:
                entry = self._persist_and_install(adapter, data)
        except KronserveError as e:
            self.metrics.adapter_load_failures.labels("upload", e.code).inc()
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
                self.store.delete(task)
            with self._lock:
                self._unavailable.pop(task, None)
                if entry is not None:
                    del self._active[task]
                    self._last_used.pop(task, None)
                    self._retire(entry.slot)
        self._update_gauges()
        return entry

    def evict(self, task: str) -> Entry | None:
        """Stop serving `task` here, leaving the store alone: a cluster replica drops its copy of a task
        another replica owns once it is idle. Batches holding it finish first (the slot is retired)."""
        with self._mutate, self._lock:
            entry = self._active.pop(task, None)
            if entry is not None:
                self._last_used.pop(task, None)
                self._retire(entry.slot)
        self._update_gauges()
        return entry

    def idle_s(self, task: str) -> float:
        """Seconds since a request last took `task` (since start-up if none has)."""
        return time.monotonic() - self._last_used.get(task, self._started)

    def load_store(self, select: Callable[[str], bool] | None = None) -> list[str]:
        """Serve every active version in the store (or those `select` picks); a bad one is logged, counted, skipped."""
        loaded = []
        for task in self.store.tasks() if self.store else []:
            if select is not None and not select(task):
                continue
            try:
                self.refresh(task)
                loaded.append(task)
            except KronserveError as e:
                self.metrics.adapter_load_failures.labels("store", e.code).inc()
                self._unavailable[task] = f"{e.code}: {e}"
                log.error("store: skipping task %r: %s", task, e)
        self._update_gauges()
        return loaded

    def refresh(self, task: str) -> Entry | None:
        """Make the served version of `task` the store's active one (also one uploaded elsewhere)."""
        assert self.store is not None
        with self._mutate:
            ref = self.store.active(task)
            current = self._active.get(task)
            if ref is None:
                self._unavailable.pop(task, None)
                if current is not None:
                    with self._lock:
                        del self._active[task]
                        self._retire(current.slot)
                self._update_gauges()
                return None
            if current is not None and (current.version, current.sha256) == (ref.version, ref.sha256):
                return current
            started = time.perf_counter()
            adapter = native.loads(self.store.read(ref), self.fingerprint)
            adapter = replace(adapter, task=task)
            entry = self.install(adapter, ref.version, ref.sha256)
        self.metrics.adapter_loads.labels("store").inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return entry

    def _persist_and_install(self, adapter: AdapterFile, data: bytes) -> Entry:
        if self.store is None:
            current = self._active.get(adapter.task)
            return self.install(adapter, (current.version if current else 0) + 1, sha256_of(data))
        ref = self.store.write(adapter.task, data)  # raises with nothing written
        try:
            slot = self._allocate(adapter.task)
            try:
                self.bank.write(slot, adapter)
                self._activate(ref)
            except BaseException:
                self._return_unused(slot)
                raise
        except BaseException:
            self._discard(ref)
            raise
        return self._swap(adapter, ref.version, ref.sha256, slot)

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

    def _swap(self, adapter: AdapterFile, version: int, sha256: str, slot: int) -> Entry:
        params = adapter.spec.param_count(adapter.geometry)
        entry = Entry(adapter.task, version, sha256, slot, adapter.spec, params, base_model=adapter.base_model)
        with self._lock:
            old = self._active.get(adapter.task)
            self._active[adapter.task] = entry
            self._unavailable.pop(adapter.task, None)
            if old is not None:
                self._retire(old.slot)
        self._update_gauges()
        return entry

    # ---- slots -------------------------------------------------------------------------------
    def _allocate(self, task: str) -> int:
        """A free slot. The last one is kept for updates: a new task may not take it, so an existing task can
        always get the second slot its new version needs until the old one's batches end."""
        with self._lock:
            free = len(self._free) + self.bank.max_slots - self._next_slot
            kept = 1 if task not in self._active and self.bank.max_slots > 1 else 0
            if free <= kept:
                raise BankFull(
                    f"all {self.bank.max_slots} adapter slots are in use (one is kept for updates of existing tasks)"
                )
            if self._free:
                return self._free.pop()
            self._next_slot += 1
            return self._next_slot - 1

    def _return_unused(self, slot: int) -> None:
        with self._lock:
            self._free_slot(slot)

    def _retire(self, slot: int) -> None:
        """Called under the lock: free now if no batch holds the slot, else when the last one ends."""
        if self._refs[slot] > 0:
            self._retired.add(slot)
        else:
            self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self.bank.clear(slot)
        self._free.append(slot)

    def _update_gauges(self) -> None:
        self.metrics.adapters_active.set(len(self._active))
        self.metrics.adapters_unavailable.set(len(self._unavailable))
        self.metrics.adapters_resident.set(self.bank.loaded())
