"""Dense bottleneck adapters: Houlsby (two per block) and Pfeiffer (after the feed-forward only).

`A(z) = up(act(down(z)))`, both `nn.Linear` with bias and stored in nn.Linear orientation
(`down.weight` [k, d], `up.weight` [d, k]) as AdapterHub and PEFT store them.
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AdapterSpec, DenseAdapter, Geometry

INIT_STD = 0.01  # Houlsby et al.: near-identity init from a zero-mean Gaussian, std 1e-2; biases zero


class BottleneckSpec(AdapterSpec):
    family = "bottleneck"

    method: Literal["houlsby", "pfeiffer"]

    def site_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        d, k = geometry.d_model, self.bottleneck(geometry)
        return {"down.weight": (k, d), "down.bias": (k,), "up.weight": (d, k), "up.bias": (d,)}

    def init_site(self, shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(shape) if name.endswith("bias") else torch.randn(shape, generator=gen) * INIT_STD
            for name, shape in shapes.items()
        }

    def dense(self, tensors: dict[str, torch.Tensor], site: str) -> DenseAdapter:
        p = f"{site}."
        return DenseAdapter(
            tensors[f"{p}down.weight"].T,
            tensors[f"{p}down.bias"],
            tensors[f"{p}up.weight"].T * self.scaling,
            tensors[f"{p}up.bias"] * self.scaling,
        )
