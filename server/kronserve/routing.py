"""The Route: which bank slot each row of one batch uses. Built once per batch, passed explicitly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BARE = -1  # slot of a row that runs the bare backbone


@dataclass(frozen=True)
class Route:
    """Row -> slot for the B requests of a batch (`slots` [B], long, on the model's device).

    The decoder of a beam search sees B·m rows with each request's beams contiguous (HF's
    `repeat_interleave` expansion), so `expand(n)` views any n = B·m rows as [B, m]: the Route
    expands itself for beams without being rebuilt.
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
