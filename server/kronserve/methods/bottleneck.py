"""Dense bottleneck adapters: Houlsby (two per block) and Pfeiffer (after the feed-forward only).

`A(z) = up(act(down(z)))`, both `nn.Linear` with bias and stored in nn.Linear orientation
(`down.weight` [k, d], `up.weight` [d, k]) as AdapterHub and PEFT store them.
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AdapterSpec, DenseAdapter, Geometry


class BottleneckSpec(AdapterSpec):
    family = "bottleneck"

    method: Literal["houlsby", "pfeiffer"]

    def site_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        d, k = geometry.d_model, self.bottleneck(geometry)
        return {"down.weight": (k, d), "down.bias": (k,), "up.weight": (d, k), "up.bias": (d,)}

    def init_site(self, shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """As the Compacter paper's code (rabeehk/compacter, seq2seq/adapters/adapter_modeling.py `Adapter`): its
        down and up are plain `nn.Linear`s that T5PreTrainedModel._init_weights leaves alone, so weight and bias
        keep torch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with a=sqrt(5))."""
        fan_in = {"down": shapes["down.weight"][1], "up": shapes["up.weight"][1]}
        out = {}
        for name, shape in shapes.items():
            bound = fan_in[name.split(".")[0]] ** -0.5
            out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        return out

    def dense(self, tensors: dict[str, torch.Tensor], site: str) -> DenseAdapter:
        p = f"{site}."
        return DenseAdapter(
            tensors[f"{p}down.weight"].T,
            tensors[f"{p}down.bias"],
            tensors[f"{p}up.weight"].T * self.scaling,
            tensors[f"{p}up.bias"] * self.scaling,
        )
