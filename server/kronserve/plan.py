"""The per-batch routing: which bank slot each row reads (the Route) and the plan the sites call.

A plan is built for the rows present in one forward pass (an admission's encoder pass, a decode step
over the running rows, a score pass) and handed to every installed site through
`SiteRouter.activate`: never module state. `SitePlan` is the one interface the sites read; the
serving `BatchPlan` (gathered per row from the bank) and the trainer's `TrainablePlan` (one task,
differentiable) both implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .kernels import ACTIVATIONS, Kernels

if TYPE_CHECKING:
    from .bank import RowInfo, Stacks

BARE = -1  # slot of a row that runs the bare backbone
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


@dataclass(frozen=True)
class Route:
    """Row -> slot for the B rows of a forward pass (`slots` [B], long, on the model's device).

    Hugging Face's beam search shows the decoder B·m rows with each request's beams contiguous
    (`repeat_interleave`), so `expand(n)` views any n = B·m rows as [B, m]: the Route expands itself for
    beams without being rebuilt. The step loop gives every decoder row its own slot (m = 1).
    """

    slots: torch.Tensor

    @classmethod
    def of(cls, slots: Sequence[int], device: torch.device | str = "cpu") -> Route:
        if any(s < BARE for s in slots):
            raise ValueError(f"slots must be >= {BARE}: {list(slots)}")
        return cls(torch.tensor(list(slots), dtype=torch.long, device=device))

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


class BatchPlan:
    """One batch's view of the bank: rows gathered per site on first use, masks built once."""

    def __init__(self, route: Route, stacks: Stacks, infos: list[RowInfo | None], kernels: Kernels) -> None:
        self.route, self.kernels = route, kernels
        self._stacks = stacks
        self._rows = route.slots + 1  # bank row of each request
        self._infos = infos
        present = [i for i in infos if i is not None]
        self._sites = frozenset().union(*(i.sites for i in present))
        self._linears = frozenset().union(*(i.linears for i in present))
        self.use_norms = any(i.has_norms for i in present)
        self._k = max((i.k for i in present), default=0)
        self._acts = self._groups([i.activation if i else None for i in infos], ACTIVATIONS)
        self._placements = self._groups([i.placement if i else None for i in infos], {p: p for p in PLACEMENTS})
        self._lora_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._site_cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self._norm_cache: dict[int, torch.Tensor] = {}
        self._mask_cache: dict[int, torch.Tensor | None] = {}

    def _groups(self, names: list[str | None], table: dict) -> list:
        """[(value, mask)] for the names present; bare rows join the first group (their weights are 0)."""
        order = sorted({n for n in names if n is not None}) or [next(iter(table))]
        if len(order) == 1:
            return [(table[order[0]], None)]
        dev = self.route.slots.device
        return [(table[name], torch.tensor([n == name for n in names], device=dev).view(-1, 1, 1)) for name in order]

    def acts_at(self, site: int) -> bool:
        """Whether any row of the batch has an adapter at `site` (else the site adds nothing)."""
        return site in self._sites

    def delta(self, site: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The adapter output to add at `site`, for residual `x` and sublayer output `f` ([R, T, d])."""
        shape = x.shape
        m = self.route.expand(shape[0])
        x = x.reshape(self.route.rows, m * shape[1], shape[2])  # [B, m·T, d]: beams ride with their row
        f = f.reshape(x.shape)
        z = self._adapter_input(x, f)
        out = self.kernels.bottleneck(z, *self._site_weights(site), self._acts)
        rows = self._site_rows(site)
        if rows is not None:  # rows without an adapter here add exactly 0, even where z overflowed to Inf
            out = torch.where(rows, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.reshape(shape)

    def _site_rows(self, site: int) -> torch.Tensor | None:
        """[B, 1, 1] mask of the rows with an adapter at `site`, or None when every row has one."""
        if site not in self._mask_cache:
            has = [i is not None and site in i.sites for i in self._infos]
            self._mask_cache[site] = None if all(has) else torch.tensor(has, device=self._rows.device).view(-1, 1, 1)
        return self._mask_cache[site]

    def lora_acts_at(self, linear: int) -> bool:
        return linear in self._linears

    def lora_delta(self, linear: int, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update `s·(x A)B` of projection `linear` for each row's task, for input x [R, T, in]."""
        a, b, rows = self._lora_weights(linear)
        shape = x.shape
        self.route.expand(shape[0])  # checks that the rows divide; beams ride with their request
        out = self.kernels.lora(x.reshape(self.route.rows, -1, shape[-1]), a, b)  # [B, m·T, out]
        if rows is not None:
            out = torch.where(rows, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.reshape(*shape[:-1], b.shape[-1])

    def _lora_weights(self, linear: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if linear not in self._lora_cache:
            a, b = self._stacks.lora[linear]
            has = [i is not None and linear in i.linears for i in self._infos]
            mask = None if all(has) else torch.tensor(has, device=self._rows.device).view(-1, 1, 1)
            self._lora_cache[linear] = (a.index_select(0, self._rows), b.index_select(0, self._rows), mask)
        return self._lora_cache[linear]

    def norm_weight(self, norm: int) -> torch.Tensor:
        """Per-row RMSNorm weights [B, 1, d] of norm `norm`."""
        if norm not in self._norm_cache:
            self._norm_cache[norm] = self._stacks.norms[norm].index_select(0, self._rows).unsqueeze(1)
        return self._norm_cache[norm]

    def _adapter_input(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        inputs = {"houlsby": lambda: f, "pfeiffer": lambda: x + f, "parallel": lambda: x}
        first, _ = self._placements[0]
        z = inputs[first]()
        for name, mask in self._placements[1:]:
            z = torch.where(mask, inputs[name](), z)
        return z

    def _site_weights(self, site: int) -> tuple[torch.Tensor, ...]:
        if site not in self._site_cache:
            st, k, rows = self._stacks, self._k, self._rows
            self._site_cache[site] = (
                st.down_w[site, :, :, :k].index_select(0, rows),  # [B, d, k]
                st.down_b[site, :, :k].index_select(0, rows),  # [B, k]
                st.up_w[site, :, :k, :].index_select(0, rows),  # [B, k, d]
                st.up_b[site].index_select(0, rows),  # [B, d]
            )
        return self._site_cache[site]
