"""LoRA (Hu et al. 2021) with PEFT's semantics: `y = x Wᵀ + s · (x Aᵀ) Bᵀ` on targeted projections.

`A` [r, in] and `B` [out, r] per projection, named `{stack}.{block}.{mh|cross|ffn}.{proj}.lora_A|lora_B`
(PEFT's `lora_A.weight`/`lora_B.weight` orientation); `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
Targets name projections as PEFT's `target_modules` do on T5: q, k, v, o (self- and cross-attention)
and wi, wo (feed-forward). PEFT inits A with kaiming-uniform(a=sqrt(5)) and B with zeros.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..errors import InvalidSpec
from .base import Geometry, LinearKind, MethodSpec


class LoraSpec(MethodSpec):
    family = "lora"
    kernel = "lora"

    method: Literal["lora"]
    rank: int = Field(ge=1, le=4096)
    alpha: float = Field(gt=0, allow_inf_nan=False, le=1e6)
    targets: tuple[LinearKind, ...] = Field(min_length=1)
    rslora: bool = False

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"targets repeat an entry: {list(v)}")
        return v

    @field_validator("layer_norms")
    @classmethod
    def _no_norms(cls, v: bool) -> bool:
        if v:
            raise ValueError("per-task layer norms are not supported with LoRA")
        return v

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check_geometry(self, geometry: Geometry) -> None:
        super().check_geometry(geometry)
        if not geometry.d_ff or not geometry.d_attn:
            raise InvalidSpec("LoRA needs the backbone's d_ff and attention size (backbone fingerprint too old)")
        if not self.active_linears(geometry):
            raise InvalidSpec("targets and leave_out leave no projection for this backbone")

    def active_linears(self, geometry: Geometry) -> list[str]:
        return [
            lin
            for lin in geometry.all_linears()
            if lin.rsplit(".", 1)[1] in self.targets
            and geometry.global_layer(lin.rsplit(".", 1)[0]) not in self.leave_out
        ]

    def own_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for lin in self.active_linears(geometry):
            fan_in, fan_out = geometry.linear_shape(lin)
            shapes[f"{lin}.lora_A"] = (self.rank, fan_in)
            shapes[f"{lin}.lora_B"] = (fan_out, self.rank)
        return shapes

    def init_own(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in self.own_shapes(geometry).items():
            if name.endswith("lora_B"):
                out[name] = torch.zeros(shape)
            else:  # kaiming_uniform_(a=sqrt(5)): bound = 1 / sqrt(fan_in)
                bound = 1 / math.sqrt(shape[1])
                out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        return out

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`{linear}.A` [in, r] and `{linear}.B` [r, out] (scale folded) per targeted projection, at its own rank."""
        out = {}
        for lin in self.active_linears(geometry):
            out[f"{lin}.A"], out[f"{lin}.B"] = self.low_rank(tensors, lin)
        return out

    def low_rank(self, tensors: dict[str, torch.Tensor], linear: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [in, r], B [r, out]) such that the update is `x @ A @ B`, scale folded into B."""
        return tensors[f"{linear}.lora_A"].T, tensors[f"{linear}.lora_B"].T * self.scale
