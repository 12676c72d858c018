"""The adapter arithmetic of a mixed batch behind one small interface: a torch reference and fast paths.

Semantics (what every implementation computes; the reference below is these loops):

    bottleneck:  for b in rows:  A_b(z_b) = act_b(z_b @ down_w[b] + down_b[b]) @ up_w[b] + up_b[b]
    lora:        for b in rows:  L_b(x_b) = (x_b @ a[b]) @ b[b]

`z`, `x` [B, M, in] (M = tokens, times beams when a request's beams ride as one row group), weights
gathered per row: down_w [B, d, K], down_b [B, K], up_w [B, K, d], up_b [B, d]; LoRA a [B, in, R]
(scaling folded in), b [B, R, out]. A row whose weights are zero (the bare backbone) gets exactly zero.
`acts` is a list of (activation, row mask [B, 1, 1] or None): one entry when every row uses the same
activation, else the first is the default and each later one overrides it on the rows of its mask.

The sites never call these functions directly: a plan holds the `Kernels` that `select_kernels` chose
for its device (vLLM's `punica_selector` idea), so a CUDA/Triton path is one more class here and one
more line in the selector, tested against `ReferenceKernels` like the torch path is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

Act = Callable[[torch.Tensor], torch.Tensor]
ActGroups = Sequence[tuple[Act, torch.Tensor | None]]

ACTIVATIONS: dict[str, Act] = {
    "gelu": F.gelu,  # exact erf form
    "gelu_new": lambda h: F.gelu(h, approximate="tanh"),  # HF's NewGELU formula, as one fused op
    "relu": F.relu,
    "swish": F.silu,
}


class Kernels(Protocol):
    """The per-row adapter arithmetic one plan runs; see the module docstring for the semantics."""

    name: str

    def bottleneck(
        self,
        z: torch.Tensor,
        down_w: torch.Tensor,
        down_b: torch.Tensor,
        up_w: torch.Tensor,
        up_b: torch.Tensor,
        acts: ActGroups,
    ) -> torch.Tensor: ...

    def lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...


class TorchKernels:
    """Batched matmuls over the per-row gathered weights (BGMV-style): any device torch runs on."""

    name = "torch"

    def bottleneck(
        self,
        z: torch.Tensor,
        down_w: torch.Tensor,
        down_b: torch.Tensor,
        up_w: torch.Tensor,
        up_b: torch.Tensor,
        acts: ActGroups,
    ) -> torch.Tensor:
        h = torch.baddbmm(down_b.unsqueeze(1), z, down_w)  # [B, M, K]
        h = _activate(h, acts)
        return torch.baddbmm(up_b.unsqueeze(1), h, up_w)  # [B, M, d]

    def lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(torch.bmm(x, a), b)  # [B, M, out]


class ReferenceKernels:
    """Row-by-row loops: the semantics the fast paths must match (tests only; slow by design)."""

    name = "reference"

    def bottleneck(
        self,
        z: torch.Tensor,
        down_w: torch.Tensor,
        down_b: torch.Tensor,
        up_w: torch.Tensor,
        up_b: torch.Tensor,
        acts: ActGroups,
    ) -> torch.Tensor:
        out = torch.empty_like(z)
        for row in range(z.shape[0]):
            h = z[row] @ down_w[row] + down_b[row]
            act = acts[0][0]
            for fn, mask in acts[1:]:
                if bool(mask[row]):
                    act = fn
            out[row] = act(h) @ up_w[row] + up_b[row]
        return out

    def lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x[row] @ a[row]) @ b[row] for row in range(x.shape[0])])


def select_kernels(device: torch.device) -> Kernels:
    """The fastest implementation for `device` (today: torch's batched matmuls everywhere)."""
    return TorchKernels()


def _activate(h: torch.Tensor, acts: ActGroups) -> torch.Tensor:
    first, _ = acts[0]
    out = first(h)
    for fn, mask in acts[1:]:
        out = torch.where(mask, fn(h), out)
    return out
