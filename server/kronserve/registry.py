"""Task id -> active version -> bank slot; the only place that decides when a slot is free.

A swap is one dict assignment under a lock: a batch leases the entries it resolved, so it finishes
on the versions it started with, and a replaced or deleted version's slot is cleared only once its
last lease ends. Reads never see a half-loaded adapter: the new slot is filled before the swap.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .bank import AdapterBank
from .errors import BankFull, UnknownTask
from .formats.native import AdapterFile
from .methods import AdapterSpec
from .routing import BARE


@dataclass(frozen=True)
class Entry:
    """One loaded version of a task. Identity = task + version + sha256 of its file."""

    task: str
    version: int
    sha256: str
    slot: int
    spec: AdapterSpec
    params: int


class Registry:
    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self._lock = threading.Lock()
        self._active: dict[str, Entry] = {}
        self._refs: Counter[int] = Counter()
        self._retired: set[int] = set()
        self._free: list[int] = []
        self._next_slot = 0

    def install(self, adapter: AdapterFile, version: int, sha256: str) -> Entry:
        """Load `adapter` into a fresh slot, then make it the task's active version atomically."""
        slot = self._allocate()
        try:
            self.bank.write(slot, adapter)
        except BaseException:
            self._release(slot)
            raise
        entry = Entry(adapter.task, version, sha256, slot, adapter.spec, adapter.spec.param_count(adapter.geometry))
        with self._lock:
            old = self._active.get(adapter.task)
            self._active[adapter.task] = entry
            if old is not None:
                self._retire(old.slot)
        return entry

    def remove(self, task: str) -> Entry:
        with self._lock:
            entry = self._active.pop(task, None)
            if entry is None:
                raise UnknownTask(f"unknown task {task!r}")
            self._retire(entry.slot)
        return entry

    def get(self, task: str) -> Entry:
        entry = self._active.get(task)
        if entry is None:
            raise UnknownTask(f"unknown task {task!r}")
        return entry

    def entries(self) -> list[Entry]:
        return sorted(self._active.values(), key=lambda e: e.task)

    def resident(self) -> int:
        """Slots holding weights: active versions plus retired ones still in use by a batch."""
        return self.bank.loaded()

    @contextmanager
    def lease(self, tasks: Sequence[str | None]) -> Iterator[list[Entry | None]]:
        """Resolve every task (None = bare backbone) before the batch runs; hold their slots until it ends.

        Raises UnknownTask naming the first unknown task; nothing is leased then.
        """
        with self._lock:
            entries = [None if t is None else self._active.get(t) for t in tasks]
            for t, e in zip(tasks, entries, strict=True):
                if t is not None and e is None:
                    raise UnknownTask(f"unknown task {t!r}")
            slots = [e.slot for e in entries if e is not None]
            self._refs.update(slots)
        try:
            yield entries
        finally:
            with self._lock:
                self._refs.subtract(slots)
                for s in set(slots):
                    if self._refs[s] <= 0:
                        del self._refs[s]
                        if s in self._retired:
                            self._retired.discard(s)
                            self._free_slot(s)

    @staticmethod
    def slots_of(entries: Sequence[Entry | None]) -> list[int]:
        return [BARE if e is None else e.slot for e in entries]

    def _allocate(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._next_slot >= self.bank.max_slots:
                raise BankFull(f"all {self.bank.max_slots} adapter slots are in use")
            self._next_slot += 1
            return self._next_slot - 1

    def _release(self, slot: int) -> None:
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
