"""The routed bottleneck: every row of a batch through its own adapter, in one batched computation.

Semantics (the reference below, in plain loops):

    for b in rows:  A_b(z_b) = act_b(z_b @ down_w[b] + down_b[b]) @ up_w[b] + up_b[b]

`z` [B, M, d] (M = tokens, times beams when the decoder runs a beam search), weights gathered per
row: down_w [B, d, K], down_b [B, K], up_w [B, K, d], up_b [B, d]. A row whose weights are zero (the
bare backbone) gets exactly zero. `acts` is a list of (activation, row mask [B, 1, 1] or None): one
entry when every row uses the same activation, else the first is the default and each later one
overrides it on the rows of its mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Act = Callable[[torch.Tensor], torch.Tensor]
ActGroups = Sequence[tuple[Act, torch.Tensor | None]]


def routed_bottleneck(
    z: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    up_w: torch.Tensor,
    up_b: torch.Tensor,
    acts: ActGroups,
) -> torch.Tensor:
    """Fast path: two batched matmuls (BGMV-style) over the per-row gathered weights."""
    h = torch.baddbmm(down_b.unsqueeze(1), z, down_w)  # [B, M, K]
    h = _activate(h, acts)
    return torch.baddbmm(up_b.unsqueeze(1), h, up_w)  # [B, M, d]


def routed_bottleneck_reference(
    z: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    up_w: torch.Tensor,
    up_b: torch.Tensor,
    acts: ActGroups,
) -> torch.Tensor:
    """Row-by-row loop; the semantics the fast path must match."""
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        h = z[b] @ down_w[b] + down_b[b]
        act = acts[0][0]
        for fn, mask in acts[1:]:
            if bool(mask[b]):
                act = fn
        out[b] = act(h) @ up_w[b] + up_b[b]
    return out


def _activate(h: torch.Tensor, acts: ActGroups) -> torch.Tensor:
    first, _ = acts[0]
    out = first(h)
    for fn, mask in acts[1:]:
        out = torch.where(mask, fn(h), out)
    return out
