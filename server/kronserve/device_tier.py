"""The device tier: the adapters batches read, in pools of same-layout rows, LRU within a byte budget.

A resident version has a *slot* (an int the routes carry) naming its pool and row. A pool is one
[capacity, row] tensor per layout (see compact.py): loading is one row copy, gathering a batch's rows is
one `index_select` per part. The budget counts the bytes of occupied rows (each adapter its own size);
pools grow by doubling within it and are freed when empty, or halved when a quarter full.

Every change that moves or writes device tensors (`hold`) runs under the engine's forward lock, as does
every plan, so a plan's gathers never see a row being written. `release`/`drop` only touch the maps.
A version leased by a request (held from admission to its last step) or whose task is pinned is never
evicted; when the leased set alone needs more than the budget, the tier goes over it rather than refuse
(the loop admits one request beyond the budget only when nothing else is running).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .compact import Compact, Layout
from .kernels import select_kernels
from .metrics import Metrics
from .plan import BatchPlan, Group, Route, SiteNames

Key = Hashable  # a version's identity: (task, version, sha256)


class Pool:
    def __init__(self, layout: Layout, device: torch.device, dtype: torch.dtype, capacity: int) -> None:
        self.layout = layout
        self.rows = torch.zeros(capacity, layout.numel, device=device, dtype=dtype)
        self.free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def put(self, flat: torch.Tensor, max_capacity: int) -> int:
        """Copy `flat` into a free row, growing by doubling up to `max_capacity` rows (the budget's share)."""
        if not self.free:
            self.resize(max(self.capacity + 1, min(2 * self.capacity, max_capacity)), {})
        row = self.free.pop()
        self.rows[row].copy_(flat)
        return row

    def resize(self, capacity: int, moves: dict[int, int]) -> None:
        """A new tensor of `capacity` rows; occupied rows keep their index when they fit, else move to a free
        one (recorded in `moves`: old -> new)."""
        occupied = sorted(set(range(self.capacity)) - set(self.free))
        new = torch.zeros(capacity, self.layout.numel, device=self.rows.device, dtype=self.rows.dtype)
        staying = [r for r in occupied if r < capacity]
        spare = sorted(set(range(capacity)) - set(staying), reverse=True)
        for r in occupied:
            to = r if r < capacity else spare.pop()
            new[to] = self.rows[r]
            if to != r:
                moves[r] = to
        self.rows = new
        taken = set(staying) | set(moves.values())
        self.free = [r for r in range(capacity - 1, -1, -1) if r not in taken]


@dataclass
class Resident:
    key: Key
    task: str
    slot: int
    pool: Pool
    row: int
    nbytes: int
    leases: int = 0
    retired: bool = False


class DeviceTier:
    def __init__(
        self,
        names: SiteNames,
        base_norms: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        budget_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.names, self.device, self.dtype, self.budget = names, device, dtype, budget_bytes
        self.metrics = metrics or Metrics()
        self.kernels = select_kernels(device)
        self._base_norms = base_norms.to(device, dtype)  # [norms, d]
        self._lock = threading.Lock()
        self._pools: dict[Layout, Pool] = {}
        self._by_key: OrderedDict[Key, Resident] = OrderedDict()  # least recently used first
        self._by_slot: dict[int, Resident] = {}
        self._pinned: dict[str, int] = {}  # pinned task -> the bytes reserved for it in the budget
        self._next_slot = 0
        self.used_bytes = 0
        self.generation = 0  # changes whenever a pool's tensor or rows change: plans built before may be stale

    # ---- reads (any thread) -----------------------------------------------------------------------
    def resident(self, key: Key) -> Resident | None:
        return self._by_key.get(key)

    def leased(self) -> tuple[set[Key], int, int]:
        """(versions held by requests or pins, their bytes, the budget): what admission may add to."""
        with self._lock:
            held = [r for r in self._by_key.values() if r.leases or r.task in self._pinned]
            return {r.key for r in held}, sum(r.nbytes for r in held), self.budget

    def pinned_bytes(self) -> int:
        """The bytes reserved by pins: what pinned tasks need on the device, loaded yet or not."""
        with self._lock:
            return sum(self._pinned.values())

    def reservation(self, task: str) -> int | None:
        """The bytes pinned for `task` (None: not pinned)."""
        return self._pinned.get(task)

    def count(self) -> int:
        return len(self._by_key)

    def has_slot(self, slot: int) -> bool:
        return slot in self._by_slot

    def versions(self) -> list[Key]:
        with self._lock:
            return list(self._by_key)

    def pinned(self, task: str) -> bool:
        return task in self._pinned

    # ---- residency (engine thread, under the forward lock) -------------------------------------------
    def hold(self, wants: Sequence[tuple[Key, str, Compact] | None]) -> list[int]:
        """Lease each wanted version (None: the bare backbone), loading the missing ones: their slots, in order."""
        with self._lock:
            for pool in list(self._pools.values()):  # thinned by releases since the last hold
                self._shrink(pool)
            missing: dict[Key, tuple[str, Compact]] = {}
            for want in wants:
                if want is not None and want[0] not in self._by_key:
                    missing[want[0]] = (want[1], want[2])
            need = sum(c.nbytes for _, c in missing.values())
            protect = set(missing) | {w[0] for w in wants if w is not None}
            self._evict_for(need, protect)
            for key, (task, c) in missing.items():
                started = time.perf_counter()
                self._load(key, task, c)
                self.metrics.tier_misses.labels("device").inc()
                self.metrics.tier_load_seconds.labels("device").observe(time.perf_counter() - started)
            slots = []
            for want in wants:
                if want is None:
                    slots.append(-1)
                    continue
                r = self._by_key[want[0]]
                if want[0] not in missing:
                    self.metrics.tier_hits.labels("device").inc()
                r.leases += 1
                self._by_key.move_to_end(want[0])
                slots.append(r.slot)
        self._gauges()
        return slots

    def _load(self, key: Key, task: str, c: Compact) -> None:
        pool = self._pools.get(c.layout)
        if pool is None:
            pool = self._pools[c.layout] = Pool(c.layout, self.device, self.dtype, 1)
        row = pool.put(c.flat.to(self.device), max(1, self.budget // max(c.nbytes, 1)))
        self.generation += 1
        r = Resident(key, task, self._next_slot, pool, row, c.nbytes)
        self._next_slot += 1
        self._by_key[key] = r
        self._by_slot[r.slot] = r
        self.used_bytes += c.nbytes

    def _evict_for(self, need: int, protect: set[Key]) -> None:
        """Evict least recently used versions no request holds, no pin keeps and `protect` does not name, until
        `need` more bytes fit the budget (or nothing more can go)."""
        for key in list(self._by_key):
            if self.used_bytes + need <= self.budget:
                return
            r = self._by_key[key]
            if r.leases or key in protect or r.task in self._pinned:
                continue
            self._remove(r)
            self.metrics.tier_evictions.labels("device").inc()

    def _remove(self, r: Resident) -> None:
        self._forget(r)
        self._shrink(r.pool)

    def _shrink(self, pool: Pool) -> None:
        """Give memory back: an empty pool is freed, a quarter-full one halved (rows move, which is why only
        `hold`, under the forward lock, calls this)."""
        if pool.used == 0:
            self._pools.pop(pool.layout, None)
            self.generation += 1
        elif pool.capacity >= 8 and pool.used <= pool.capacity // 4:
            self.generation += 1
            moves: dict[int, int] = {}
            pool.resize(pool.capacity // 2, moves)
            for other in self._by_key.values():
                if other.pool is pool and other.row in moves:
                    other.row = moves[other.row]

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            for slot in slots:
                r = self._by_slot.get(slot)
                if r is None:
                    continue
                r.leases -= 1
                if r.leases <= 0 and r.retired:
                    self._forget(r)
        self._gauges()

    def drop(self, key: Key) -> None:
        """A replaced or deleted version: gone now if no request holds it, else when the last one leaves."""
        with self._lock:
            r = self._by_key.get(key)
            if r is not None:
                r.retired = True
                if r.leases <= 0:
                    self._forget(r)
        self._gauges()

    def _forget(self, r: Resident) -> None:
        """Free the row without touching any device tensor (a plan may be reading them from another thread):
        the row is only written again by a later `hold`, under the forward lock."""
        del self._by_key[r.key]
        del self._by_slot[r.slot]
        self.used_bytes -= r.nbytes
        r.pool.free.append(r.row)

    def pin(self, task: str, nbytes: int) -> None:
        """Keep `task`'s versions here, never evicted, with `nbytes` of the budget reserved for it (the engine checks
        the reservations fit the budget: a pinned task's version is loaded even where the budget is full)."""
        with self._lock:
            self._pinned[task] = nbytes

    def unpin(self, task: str) -> None:
        with self._lock:
            self._pinned.pop(task, None)

    # ---- plans (on the thread that owns the device) -------------------------------------------------------------
    def plan(self, route: Route) -> BatchPlan:
        with self._lock:
            members: dict[Pool, list[tuple[int, int]]] = {}
            for i, slot in enumerate(route.host or route.slots.tolist()):
                if slot >= 0:
                    r = self._by_slot[slot]
                    members.setdefault(r.pool, []).append((i, r.row))
        dev = route.slots.device
        groups = []
        for pool, rows in members.items():
            index = None if len(rows) == route.rows else torch.tensor([i for i, _ in rows], device=dev)
            groups.append(Group(pool.layout, pool.rows, index, torch.tensor([r for _, r in rows], device=dev)))
        return BatchPlan(route, groups, self.names, self._base_norms, self.kernels)

    def _gauges(self) -> None:
        self.metrics.tier_adapters.labels("device").set(len(self._by_key))
        self.metrics.tier_bytes.labels("device").set(self.used_bytes)
