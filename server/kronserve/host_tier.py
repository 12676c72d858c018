"""The host tier: compact adapters in host memory, LRU within a byte budget, between the store and the device.

A request's adapter is fetched here when it is accepted (off the event loop), so the engine thread only
ever copies from host memory to the device. A host miss reads the store, validates the file and packs it
(`compact.compact`); a version being fetched once is fetched once, whoever else asks meanwhile. The request
keeps its own reference to the packed adapter, so an eviction here never takes it from under a request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, KeysView

from .compact import Compact
from .metrics import Metrics

Key = Hashable


class HostTier:
    def __init__(self, budget_bytes: int, metrics: Metrics | None = None) -> None:
        self.budget = budget_bytes
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._items: OrderedDict[Key, Compact] = OrderedDict()  # least recently used first
        self._loading: dict[Key, threading.Lock] = {}
        self.used_bytes = 0

    def get(self, key: Key, load: Callable[[], Compact]) -> Compact:
        """The packed version, loading it with `load` on a miss (concurrent misses of one key load once)."""
        with self._lock:
            c = self._hit(key)
            if c is not None:
                return c
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                c = self._hit(key)
            if c is not None:
                return c
            started = time.perf_counter()
            try:
                c = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            self.metrics.tier_misses.labels("host").inc()
            self.metrics.tier_load_seconds.labels("host").observe(time.perf_counter() - started)
            self.put(key, c)
            return c

    def _hit(self, key: Key) -> Compact | None:
        c = self._items.get(key)
        if c is not None:
            self._items.move_to_end(key)
            self.metrics.tier_hits.labels("host").inc()
        return c

    def peek(self, key: Key) -> Compact | None:
        return self._items.get(key)

    def put(self, key: Key, c: Compact) -> None:
        with self._lock:
            if key in self._items:
                self.used_bytes -= self._items[key].nbytes
            self._items[key] = c
            self._items.move_to_end(key)
            self.used_bytes += c.nbytes
            while self.used_bytes > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.used_bytes -= old.nbytes
                self.metrics.tier_evictions.labels("host").inc()
        self._gauges()

    def drop(self, key: Key) -> None:
        with self._lock:
            c = self._items.pop(key, None)
            if c is not None:
                self.used_bytes -= c.nbytes
        self._gauges()

    def keys(self) -> KeysView[Key]:
        """A live view (cheap: the tier can hold 100,000 versions); read it, do not keep it."""
        return self._items.keys()

    def count(self) -> int:
        return len(self._items)

    def _gauges(self) -> None:
        self.metrics.tier_adapters.labels("host").set(len(self._items))
        self.metrics.tier_bytes.labels("host").set(self.used_bytes)
