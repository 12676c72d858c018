"""Device-resident adapter weights, stacked by slot, so one gathered computation serves a mixed batch.

Every method is stored in its dense bottleneck form per site (down [d, K], up [K, d], with scaling
folded in; K = the largest bottleneck loaded, smaller ones zero-padded, which contributes exactly 0).
Row 0 of every stack is the bare backbone (all zeros, base norms); slot s lives in row s + 1. The
registry decides which slots are free; the bank only fills and clears them. Growth (more slots, a
larger K) happens on load, never on the hot path: a batch plans against the tensors it snapshotted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .errors import BankFull, InvalidAdapter
from .formats.native import AdapterFile
from .kernels import select_kernels
from .methods import DenseAdapter, Geometry, LoraSpec
from .plan import BatchPlan, Route


@dataclass
class Stacks:
    down_w: torch.Tensor  # [sites, rows, d, K]
    down_b: torch.Tensor  # [sites, rows, K]
    up_w: torch.Tensor  # [sites, rows, K, d]
    up_b: torch.Tensor  # [sites, rows, d]
    norms: torch.Tensor  # [norms, rows, d]
    lora: dict[int, tuple[torch.Tensor, torch.Tensor]]  # projection -> (A [rows, in, R], B [rows, R, out])


@dataclass(frozen=True)
class RowInfo:
    k: int
    sites: frozenset[int]
    activation: str | None
    placement: str | None
    has_norms: bool
    linears: frozenset[int] = frozenset()


class AdapterBank:
    def __init__(
        self,
        geometry: Geometry,
        base_norms: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 8,
        max_slots: int = 4096,
    ) -> None:
        self.geometry = geometry
        self.sites = geometry.all_sites()
        self.site_index = {s: i for i, s in enumerate(self.sites)}
        self.norm_names = geometry.all_norms()
        self.linear_index = {name: i for i, name in enumerate(geometry.all_linears())}
        self.device, self.dtype, self.max_slots = device, dtype, max_slots
        self._base_norms = torch.stack([base_norms[n] for n in self.norm_names]).to(device, dtype)  # [N, d]
        self._lock = threading.Lock()
        self._info: dict[int, RowInfo] = {}
        self._stacks = self._allocate(capacity + 1, 1)
        self.kernels = select_kernels(device)

    @property
    def capacity(self) -> int:
        return self._stacks.down_w.shape[1] - 1

    def loaded(self) -> int:
        return len(self._info)

    def write(self, slot: int, adapter: AdapterFile) -> None:
        """Fill `slot` with `adapter` (already validated against this backbone)."""
        if not 0 <= slot < self.max_slots:
            raise BankFull(f"slot {slot} is outside the bank's 0..{self.max_slots - 1}")
        if isinstance(adapter.spec, LoraSpec):
            self._write_lora(slot, adapter.spec, adapter.tensors)
            return
        spec, k = adapter.spec, adapter.spec.bottleneck(self.geometry)
        dense = {site: self._cast(spec.dense(adapter.tensors, site), site) for site in spec.active_sites(self.geometry)}
        with self._lock:
            row = slot + 1
            self._grow(row + 1, k)
            st = self._stacks
            self._clear_row(row)
            for site, a in dense.items():
                i = self.site_index[site]
                st.down_w[i, row, :, :k] = a.down_w
                st.down_b[i, row, :k] = a.down_b
                st.up_w[i, row, :k, :] = a.up_w
                st.up_b[i, row] = a.up_b
            if spec.layer_norms:
                for j, name in enumerate(self.norm_names):
                    st.norms[j, row] = adapter.tensors[name]
            sites = frozenset(self.site_index[s] for s in dense)
            self._info[slot] = RowInfo(k, sites, spec.activation, spec.placement, spec.layer_norms)

    def _write_lora(self, slot: int, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        factors = {}
        for lin in spec.active_linears(self.geometry):
            a, b = (t.to(self.device, self.dtype) for t in spec.low_rank(tensors, lin))
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise InvalidAdapter(f"projection {lin}: LoRA factors are not finite in {self.dtype}")
            factors[self.linear_index[lin]] = (a, b)
        with self._lock:
            row = slot + 1
            self._grow(row + 1, 0)
            self._clear_row(row)
            for i, (a, b) in factors.items():
                big_a, big_b = self._lora_stack(i, spec.rank)
                big_a[row, :, : spec.rank] = a
                big_b[row, : spec.rank, :] = b
            self._info[slot] = RowInfo(0, frozenset(), None, None, False, frozenset(factors))

    def _lora_stack(self, linear: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection's stacks, allocated on first use and widened to `rank` (old rows copied)."""
        st, rows = self._stacks, self._stacks.down_w.shape[1]
        fan_in, fan_out = self.geometry.linear_shape(self.geometry.all_linears()[linear])
        old = st.lora.get(linear)
        if old is not None and old[0].shape[2] >= rank:
            return old
        kw = dict(device=self.device, dtype=self.dtype)
        new = (torch.zeros(rows, fan_in, rank, **kw), torch.zeros(rows, rank, fan_out, **kw))
        if old is not None:
            r0 = old[0].shape[2]
            new[0][:, :, :r0], new[1][:, :r0, :] = old
        st.lora[linear] = new
        return new

    def _cast(self, a: DenseAdapter, site: str) -> DenseAdapter:
        """The bank's dtype; weights that overflow it (float16: |w| > 65504) are refused, not served as Inf."""
        out = DenseAdapter(*(t.to(self.device, self.dtype) for t in (a.down_w, a.down_b, a.up_w, a.up_b)))
        for t in (out.down_w, out.down_b, out.up_w, out.up_b):
            if not torch.isfinite(t).all():
                raise InvalidAdapter(f"site {site}: materialized weights are not finite in {self.dtype}")
        return out

    def clear(self, slot: int) -> None:
        """Return `slot` to the bare backbone; the caller guarantees no batch in flight uses it."""
        with self._lock:
            if slot in self._info:
                self._clear_row(slot + 1)
                del self._info[slot]

    def plan(self, route: Route) -> BatchPlan:
        with self._lock:
            infos = [self._info.get(s) for s in route.slots.tolist()]
            st = self._stacks
            snapshot = Stacks(st.down_w, st.down_b, st.up_w, st.up_b, st.norms, dict(st.lora))
            return BatchPlan(route, snapshot, infos, self.kernels)

    def _clear_row(self, row: int) -> None:
        st = self._stacks
        for t in (st.down_w, st.down_b, st.up_w, st.up_b):
            t[:, row].zero_()
        st.norms[:, row] = self._base_norms
        for a, b in st.lora.values():
            a[row].zero_()
            b[row].zero_()

    def _grow(self, rows_needed: int, k: int) -> None:
        st = self._stacks
        rows, cur_k = st.down_w.shape[1], st.down_w.shape[3]
        if rows_needed <= rows and k <= cur_k:
            return
        new_rows = rows
        while new_rows < rows_needed:
            new_rows = min(2 * new_rows, self.max_slots + 1)
        new = self._allocate(new_rows, max(k, cur_k))
        new.down_w[:, :rows, :, :cur_k] = st.down_w
        new.down_b[:, :rows, :cur_k] = st.down_b
        new.up_w[:, :rows, :cur_k, :] = st.up_w
        new.up_b[:, :rows] = st.up_b
        new.norms[:, :rows] = st.norms
        for i, (a, b) in st.lora.items():
            big_a = torch.zeros(new_rows, *a.shape[1:], device=self.device, dtype=self.dtype)
            big_b = torch.zeros(new_rows, *b.shape[1:], device=self.device, dtype=self.dtype)
            big_a[:rows], big_b[:rows] = a, b
            new.lora[i] = (big_a, big_b)
        self._stacks = new

    def _allocate(self, rows: int, k: int) -> Stacks:
        s, d = len(self.sites), self.geometry.d_model
        kw = dict(device=self.device, dtype=self.dtype)
        norms = self._base_norms.unsqueeze(1).expand(-1, rows, -1).clone()
        return Stacks(
            torch.zeros(s, rows, d, k, **kw),
            torch.zeros(s, rows, k, **kw),
            torch.zeros(s, rows, k, d, **kw),
            torch.zeros(s, rows, d, **kw),
            norms,
            {},
        )
