"""The adapter arithmetic of a mixed batch behind one small interface: a torch reference and fast paths.

Semantics (what every implementation computes; the reference below is these loops), per row b of a group
of rows whose adapters share a layout (so one activation):

    bottleneck:  A_b(z_b) = act(z_b @ down_w[b] + down_b[b]) @ up_w[b] + up_b[b]
    phm:         P_b(x_b) = x_b @ H_b + bias[b],  H_b = Σ_i kron(rule[b, i], W_b,i),  W_b,i = L[b, i] @ R[b, i]
                 (or the dense W[b, i]); see methods/phm.py for the torch.kron order
    lora:        L_b(x_b) = (x_b @ a[b]) @ b[b]

`z`, `x` [G, M, in] (M = tokens, times beams when a request's beams ride as one row group), weights
gathered per row: down_w [G, d, K], down_b [G, K], up_w [G, K, d], up_b [G, d]; rule [G, n, n, n],
L [G, n, in/n, r], R [G, n, r, out/n], W [G, n, in/n, out/n], bias [G, out]; LoRA a [G, in, R] (scaling
folded in), b [G, R, out].

The sites never call these functions directly: a plan holds the `Kernels` that `select_kernels` chose
for its device (vLLM's `punica_selector` idea), so a CUDA/Triton path is one more class here and one
more line in the selector, tested against `ReferenceKernels` like the torch path is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from .methods.phm import phm_matrix

Act = Callable[[torch.Tensor], torch.Tensor]

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
        act: Act,
    ) -> torch.Tensor: ...

    def phm(self, x: torch.Tensor, rule: torch.Tensor, w: tuple[torch.Tensor, ...], bias: torch.Tensor) -> torch.Tensor:
        """`w` is (L, R) for factorized weights, or (W,) for dense ones."""
        ...

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
        act: Act,
    ) -> torch.Tensor:
        h = act(torch.baddbmm(down_b.unsqueeze(1), z, down_w))  # [G, M, K]
        return torch.baddbmm(up_b.unsqueeze(1), h, up_w)  # [G, M, d]

    def phm(self, x: torch.Tensor, rule: torch.Tensor, w: tuple[torch.Tensor, ...], bias: torch.Tensor) -> torch.Tensor:
        """From the factors, never forming H: with x split into n blocks x_a, output block c is
        `Σ_i Σ_a rule[i, a, c] · x_a W_i`. Factorized: u = x_a L_i, then the rule, then R_i, which costs
        n·in·r + n³·r + n·r·out multiply-adds per token against in·out for the dense H."""
        g, m, _ = x.shape
        n = rule.shape[1]
        xb = x.reshape(g, m, n, -1)  # [G, M, n(a), in/n]
        if len(w) == 2:
            left, right = w
            u = torch.einsum("gmap,gipr->gmiar", xb, left)  # x_a L_i
            v = torch.einsum("gmiar,giac->gmicr", u, rule)  # Σ_a rule[i, a, c] x_a L_i
            y = torch.einsum("gmicr,girq->gmcq", v, right)  # Σ_i (...) R_i
        else:
            t = torch.einsum("gmap,giac->gmicp", xb, rule)  # Σ_a rule[i, a, c] x_a
            y = torch.einsum("gmicp,gipq->gmcq", t, w[0])
        return y.reshape(g, m, -1) + bias.unsqueeze(1)

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
        act: Act,
    ) -> torch.Tensor:
        return torch.stack([act(z[r] @ down_w[r] + down_b[r]) @ up_w[r] + up_b[r] for r in range(z.shape[0])])

    def phm(self, x: torch.Tensor, rule: torch.Tensor, w: tuple[torch.Tensor, ...], bias: torch.Tensor) -> torch.Tensor:
        """The dense H of each row, materialized as the method defines it (methods/phm.py)."""
        out = []
        for r in range(x.shape[0]):
            weights = torch.bmm(w[0][r], w[1][r]) if len(w) == 2 else w[0][r]
            out.append(x[r] @ phm_matrix(rule[r], weights) + bias[r])
        return torch.stack(out)

    def lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x[row] @ a[row]) @ b[row] for row in range(x.shape[0])])


def select_kernels(device: torch.device) -> Kernels:
    """The fastest implementation for `device` (today: torch's batched matmuls everywhere)."""
    return TorchKernels()
