"""The per-batch routing: which device slot each row reads (the Route) and the plan the sites call.

A plan is built for the rows present in one forward pass (an admission's encoder pass, a decode step
over the running rows, a score pass) and handed to every installed site through
`SiteRouter.activate`: never module state. `SitePlan` is the one interface the sites read; the
serving `BatchPlan` (gathered per row from the device tier) and the trainer's `TrainablePlan` (one task,
differentiable) both implement it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from .kernels import ACTIVATIONS, Kernels

if TYPE_CHECKING:
    from .compact import Layout

BARE = -1  # slot of a row that runs the bare backbone


@dataclass(frozen=True)
class Route:
    """Row -> slot for the B rows of a forward pass (`slots` [B], long, on the model's device).

    Hugging Face's beam search shows the decoder B·m rows with each request's beams contiguous
    (`repeat_interleave`), so `expand(n)` views any n = B·m rows as [B, m]: the Route expands itself for
    beams without being rebuilt. The step loop gives every decoder row its own slot (m = 1).
    """

    slots: torch.Tensor
    host: tuple[int, ...] = ()  # the same slots on the host: plans are built from these, never by a device sync

    @classmethod
    def of(cls, slots: Sequence[int], device: torch.device | str = "cpu") -> Route:
        if any(s < BARE for s in slots):
            raise ValueError(f"slots must be >= {BARE}: {list(slots)}")
        host = tuple(slots)
        return cls(torch.tensor(host, dtype=torch.long, device=device), host)

    @property
    def rows(self) -> int:
        return int(self.slots.shape[0])

    def expand(self, n_rows: int) -> int:
        """How many consecutive rows of an n_rows batch belong to each request."""
        if n_rows % self.rows:
            raise RuntimeError(f"a site saw {n_rows} rows, which is not a multiple of the route's {self.rows}")
        return n_rows // self.rows


class SitePlan(Protocol):
    """What the installed sites ask of the forward pass in flight (site, norm and projection indices are
    positions in the backbone's fixed order, `Geometry.all_sites/all_norms/all_linears`)."""

    use_norms: bool

    def acts_at(self, site: int) -> bool:
        """Whether any row has an adapter at `site` (else the site adds nothing)."""
        ...

    def delta(self, site: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The adapter output to add at `site` for residual `x` and sublayer output `f` ([R, T, d])."""
        ...

    def lora_acts_at(self, linear: int) -> bool: ...

    def lora_delta(self, linear: int, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update of projection `linear` for input x [R, T, in]."""
        ...

    def norm_weight(self, norm: int) -> torch.Tensor:
        """Per-row RMSNorm weights, [R, 1, d] or [1, 1, d] (broadcast)."""
        ...

    def prefix_at(self, site: int, rows: int) -> PrefixRows | None:
        """What the `rows` rows of attention `site` attend to besides their tokens (None: the stock attention)."""
        ...


@dataclass(frozen=True)
class PrefixRows:
    """Each row's key/value prefix at one attention site, and how its positions count (methods/prefix.py).

    A row's prefix fills the first `lengths[r]` of the `keys`/`values` columns; the rest are masked. Relative
    positions, for a query at real position q: prefix key j at `j - prefix_shift - q`, real key c at
    `c - q + real_shift`. `zero_bias` rows attend with no position bias at all (AdapterHub's leave_out layers).
    """

    keys: torch.Tensor | None  # [R, P, heads·d_kv] (None: no row has a prefix here, only zero-bias rows)
    values: torch.Tensor | None
    lengths: torch.Tensor  # [R] long
    real_shift: torch.Tensor  # [R] long
    prefix_shift: torch.Tensor  # [R] long
    zero_bias: torch.Tensor  # [R] bool

    @classmethod
    def alike(
        cls, rows: int, keys: torch.Tensor | None, values: torch.Tensor | None, rule: PrefixRule, device: torch.device
    ) -> PrefixRows:
        """`rows` rows that all follow `rule`, with these prefixes ([R or 1, P, heads·d_kv]; None: no prefix)."""

        def filled(value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        length = 0 if keys is None else keys.shape[1]
        if keys is not None and values is not None:
            keys, values = keys.expand(rows, -1, -1), values.expand(rows, -1, -1)
        shifts = filled(length), filled(rule.real_shift), filled(rule.prefix_shift)
        return cls(keys, values, *shifts, filled(rule.zero_bias, torch.bool))

    def expand(self, m: int) -> PrefixRows:
        """Each request's row repeated for its m beams (HF's `repeat_interleave` order)."""
        if m == 1:
            return self

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(m, dim=0)

        return PrefixRows(
            rep(self.keys),
            rep(self.values),
            *(t.repeat_interleave(m, dim=0) for t in (self.lengths, self.real_shift, self.prefix_shift)),
            self.zero_bias.repeat_interleave(m, dim=0),
        )


@dataclass(frozen=True)
class SiteNames:
    """Index -> name of the backbone's sites, norms and projections (the orders of `Geometry.all_*`)."""

    sites: tuple[str, ...]
    norms: tuple[str, ...]
    linears: tuple[str, ...]


@dataclass
class Group:
    """The rows of one pass whose adapters share a layout (one device pool)."""

    layout: Layout
    pool: torch.Tensor  # [capacity, layout.numel]
    members: torch.Tensor | None  # which of the pass's requests (None: all of them, in order)
    rows: torch.Tensor  # each member's pool row
    _parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def part(self, name: str) -> torch.Tensor:
        """The part `name` of every member's adapter, [G, *shape]. A site's (or projection's) parts lie side by side
        in a row, so they are gathered together by one `index_select` per pass and handed out as views."""
        if name not in self._parts:
            lay, p = self.layout, self.layout.parts[name]
            key = lay.owner.get(name)
            if key is None:
                gathered = self.pool[:, p.offset : p.offset + p.numel].index_select(0, self.rows)
                self._parts[name] = gathered.view(-1, *p.shape)
            else:
                span = lay.spans[key]
                whole = self.pool[:, span.offset : span.offset + span.numel].index_select(0, self.rows)
                for part_name in lay.members[key]:
                    q = lay.parts[part_name]
                    start = q.offset - span.offset
                    self._parts[part_name] = whole[:, start : start + q.numel].view(-1, *q.shape)
        return self._parts[name]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.members is None else t.index_select(0, self.members)


class BatchPlan:
    """One pass's view of the device tier: rows grouped by layout, each group's parts gathered on first use."""

    def __init__(
        self, route: Route, groups: list[Group], names: SiteNames, base_norms: torch.Tensor, kernels: Kernels
    ) -> None:
        self.route, self.kernels, self.names = route, kernels, names
        self._groups = groups
        self._base_norms = base_norms
        self.use_norms = any(g.layout.norms for g in groups)
        self._norm_cache: dict[int, torch.Tensor] = {}
        self._prefix_cache: dict[int, PrefixRows | None] = {}

    def acts_at(self, site: int) -> bool:
        name = self.names.sites[site]
        return any(name in g.layout.sites for g in self._groups)

    def delta(self, site: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The adapter output to add at `site`, for residual `x` and sublayer output `f` ([R, T, d])."""
        shape = x.shape
        m = self.route.expand(shape[0])
        x = x.reshape(self.route.rows, m * shape[1], shape[2])  # [B, m·T, d]: beams ride with their row
        f = f.reshape(x.shape)
        name = self.names.sites[site]
        parts = [g for g in self._groups if name in g.layout.sites]
        return self._scatter(parts, x, lambda g: self._adapter(g, name, g.take(x), g.take(f))).reshape(shape)

    def _scatter(self, groups: list[Group], like: torch.Tensor, compute, width: int | None = None) -> torch.Tensor:
        """Each group's output on its own rows; rows of no group get exactly 0."""
        if len(groups) == 1 and groups[0].members is None:
            return compute(groups[0])
        out = like.new_zeros(*like.shape[:-1], width or like.shape[-1])
        for g in groups:
            out.index_copy_(0, g.members, compute(g))
        return out

    def _adapter(self, g: Group, site: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        lay = g.layout
        z = {"houlsby": f, "pfeiffer": x + f, "parallel": x}[lay.placement]
        act = ACTIVATIONS[lay.activation]
        if lay.kernel == "bottleneck":
            parts = (g.part(f"{site}.{p}") for p in ("down_w", "down_b", "up_w", "up_b"))
            return self.kernels.bottleneck(z, *parts, act)
        return self._phm(g, f"{site}.up", act(self._phm(g, f"{site}.down", z)))

    def _phm(self, g: Group, proj: str, x: torch.Tensor) -> torch.Tensor:
        parts = g.layout.parts
        rule = g.part(f"{proj}.rule" if f"{proj}.rule" in parts else "rule")
        w = (g.part(f"{proj}.W"),) if f"{proj}.W" in parts else (g.part(f"{proj}.L"), g.part(f"{proj}.R"))
        return self.kernels.phm(x, rule, w, g.part(f"{proj}.b"))

    def lora_acts_at(self, linear: int) -> bool:
        name = self.names.linears[linear]
        return any(name in g.layout.linears for g in self._groups)

    def lora_delta(self, linear: int, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update `s·(x A)B` of projection `linear` for each row's task, for input x [R, T, in]."""
        shape = x.shape
        self.route.expand(shape[0])  # checks that the rows divide; beams ride with their request
        x = x.reshape(self.route.rows, -1, shape[-1])  # [B, m·T, in]
        name = self.names.linears[linear]
        groups = [g for g in self._groups if name in g.layout.linears]
        width = groups[0].layout.parts[f"{name}.B"].shape[-1]
        out = self._scatter(
            groups, x, lambda g: self.kernels.lora(g.take(x), g.part(f"{name}.A"), g.part(f"{name}.B")), width
        )
        return out.reshape(*shape[:-1], width)

    def norm_weight(self, norm: int) -> torch.Tensor:
        """Per-row RMSNorm weights [B, 1, d] of norm `norm` (the backbone's where a row's adapter has none)."""
        if norm not in self._norm_cache:
            name = self.names.norms[norm]
            w = self._base_norms[norm].expand(self.route.rows, -1).clone()
            for g in self._groups:
                if g.layout.norms:
                    mine = g.part(name)
                    if g.members is None:
                        w = mine.clone()
                    else:
                        w.index_copy_(0, g.members, mine)
            self._norm_cache[norm] = w.unsqueeze(1)
        return self._norm_cache[norm]

    def prefix_at(self, site: int, rows: int) -> PrefixRows | None:
        """Each row's prefix at attention `site`, gathered from the device pool once per pass (None when no row's
        attention differs from the stock one there)."""
        if site not in self._prefix_cache:
            self._prefix_cache[site] = self._prefix_rows(self.names.sites[site])
        found = self._prefix_cache[site]
        return None if found is None else found.expand(self.route.expand(rows))

    def _prefix_rows(self, name: str) -> PrefixRows | None:
        involved = []
        for g in self._groups:
            if g.layout.positions is not None:
                rule = prefix_rule(g.layout.positions, name, g.layout.prefixes, g.layout.prefix_length)
                if rule.has or rule.zero_bias:
                    involved.append((g, rule))
        if not involved:
            return None
        n, device = self.route.rows, self.route.slots.device
        if len(involved) == 1 and involved[0][0].members is None and involved[0][1].has:  # one layout: as gathered
            g, rule = involved[0]
            return PrefixRows.alike(n, g.part(f"prefix.{name}.k"), g.part(f"prefix.{name}.v"), rule, device)
        longest = max((g.layout.prefix_length for g, rule in involved if rule.has), default=0)
        keys = values = None
        lengths, real_shift, prefix_shift = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(3))
        zero_bias = torch.zeros(n, dtype=torch.bool, device=device)
        for g, rule in involved:
            rows = g.members if g.members is not None else torch.arange(n, device=device)
            if rule.has:
                k, v = g.part(f"prefix.{name}.k"), g.part(f"prefix.{name}.v")  # [G, P, heads·d_kv]
                if keys is None or values is None:
                    keys, values = k.new_zeros(n, longest, k.shape[-1]), k.new_zeros(n, longest, k.shape[-1])
                keys[rows, : k.shape[1]], values[rows, : k.shape[1]] = k, v
                lengths[rows] = k.shape[1]
            real_shift[rows], prefix_shift[rows], zero_bias[rows] = rule.real_shift, rule.prefix_shift, rule.zero_bias
        return PrefixRows(keys, values, lengths, real_shift, prefix_shift, zero_bias)


@dataclass(frozen=True)
class PrefixRule:
    has: bool  # the row has a prefix at this site
    zero_bias: bool
    real_shift: int
    prefix_shift: int


def prefix_rule(positions: str, site: str, prefixed: Collection[str], length: int) -> PrefixRule:
    """How a row whose adapter has prefixes of `length` at `prefixed` attends at `site` (methods/prefix.py).

    AdapterHub: a stack's first layer computes the position bias its other layers reuse while their key lengths
    match, so a layer whose prefix presence differs from the first layer's attends with no bias at all."""
    stack, _, kind = site.split(".")
    has = site in prefixed
    zero = kind != "cross" and positions == "adapterhub" and has != (f"{stack}.0.{kind}" in prefixed)
    real = length if has and positions == "adapterhub" and not zero else 0
    return PrefixRule(has, zero, real, length if has and positions == "peft" else 0)
