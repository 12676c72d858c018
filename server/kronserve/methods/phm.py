"""PHM family: Compacter, Compacter++ and PHM-Adapter (Zhang et al. 2021; Karimi Mahabadi et al. 2021).

A PHM layer replaces a dense (in x out) weight by `H = Σ_i C_i ⊗ W_i` (torch.kron order) with rule
`C` [n, n, n] and `W` [n, in/n, out/n]; `y = x @ H + b`. Compacter shares `C` across every PHM layer
of the task and factorizes `W_i = W_left_i @ W_right_i` at rank r; PHM-Adapter keeps a rule per
layer and a dense `W`. A factorized rule is `C = C_left @ C_right` with [n, n, 1] @ [n, 1, n].
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import InvalidSpec
from .base import AdapterSpec, DenseAdapter, Geometry

# Initialization as the Compacter paper's code (rabeehk/compacter, seq2seq/), with its configs/compacter.json:
# - a shared rule (Compacter, Compacter++) ~ N(0, phm_init_range), phm_init_range = 0.0001
#   (third_party/models/t5/modeling_t5.py, T5ForConditionalGeneration.__init__, phm_c_init "normal");
# - a per-layer rule (PHM-Adapter) ~ N(0, 0.01) (hypercomplex/layers.py, PHMLinear.reset_parameters);
# - each W_i, or each factor W_left_i / W_right_i, xavier_uniform_ with gain sqrt(2) (hypercomplex/inits.py
#   glorot_uniform, hypercomplex_nonlinearity "glorot-uniform"); biases zero (PHMLinear.reset_parameters).
SHARED_RULE_STD = 1e-4
LAYER_RULE_STD = 0.01
W_GAIN = 2**0.5


def phm_matrix(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`Σ_i kron(rule[i], w[i])` without building n Kronecker products: [n,n,n], [n,P,Q] -> [nP, nQ]."""
    n, p, q = w.shape
    return torch.einsum("iac,ipq->apcq", rule, w).reshape(n * p, n * q)


class PHMSpec(AdapterSpec):
    family = "phm"
    kernel = "phm"

    method: Literal["compacter", "compacter++", "phm"]
    phm_dim: int = Field(ge=1)
    rank: int | None = Field(default=1, ge=1, description="rank of W_i; None keeps W dense (PHM-Adapter)")
    shared_rule: bool = True
    factorized_rule: bool = False

    def check_geometry(self, geometry: Geometry) -> None:
        super().check_geometry(geometry)
        n, k = self.phm_dim, self.bottleneck(geometry)
        if geometry.d_model % n:
            raise InvalidSpec(f"phm_dim {n} does not divide d_model {geometry.d_model}")
        if k % n:
            raise InvalidSpec(f"phm_dim {n} does not divide the bottleneck size {k} (d_model / reduction_factor)")

    def _rule_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        n = self.phm_dim
        if self.factorized_rule:
            return {f"{prefix}phm_rule_left": (n, n, 1), f"{prefix}phm_rule_right": (n, 1, n)}
        return {f"{prefix}phm_rule": (n, n, n)}

    def shared_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return self._rule_shapes("") if self.shared_rule else {}

    def site_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        d, k, n = geometry.d_model, self.bottleneck(geometry), self.phm_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for proj, (fan_in, fan_out) in (("down", (d, k)), ("up", (k, d))):
            if self.rank is None:
                shapes[f"{proj}.W"] = (n, fan_in // n, fan_out // n)
            else:
                shapes[f"{proj}.W_left"] = (n, fan_in // n, self.rank)
                shapes[f"{proj}.W_right"] = (n, self.rank, fan_out // n)
            shapes[f"{proj}.b"] = (fan_out,)
            if not self.shared_rule:
                shapes.update(self._rule_shapes(f"{proj}."))
        return shapes

    def init_shared(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: _init(name, shape, gen, SHARED_RULE_STD) for name, shape in self.shared_shapes(geometry).items()}

    def init_site(self, shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: _init(name, shape, gen, LAYER_RULE_STD) for name, shape in shapes.items()}

    def dense(self, tensors: dict[str, torch.Tensor], site: str) -> DenseAdapter:
        down_w, down_b = self._projection(tensors, site, "down")
        up_w, up_b = self._projection(tensors, site, "up")
        return DenseAdapter(down_w, down_b, up_w * self.scaling, up_b * self.scaling)

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The factors themselves, never `H` (see kernels.phm): a shared `rule` [n, n, n] once, and per used site
        and projection its own `.rule` (per-layer rule), `.L` [n, in/n, r] and `.R` [n, r, out/n] (or `.W`
        [n, in/n, out/n] when dense) and `.b`; a factorized rule is multiplied out (n³ numbers)."""
        out = {"rule": self._rule(tensors, "")} if self.shared_rule else {}
        for site in self.active_sites(geometry):
            for proj in ("down", "up"):
                p = f"{site}.{proj}."
                scale = self.scaling if proj == "up" else 1.0
                if not self.shared_rule:
                    out[f"{p}rule"] = self._rule(tensors, p)
                if self.rank is None:
                    out[f"{p}W"] = tensors[f"{p}W"] * scale
                else:
                    out[f"{p}L"], out[f"{p}R"] = tensors[f"{p}W_left"], tensors[f"{p}W_right"] * scale
                out[f"{p}b"] = tensors[f"{p}b"] * scale
        return out

    def _rule(self, t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        if self.factorized_rule:
            return torch.bmm(t[f"{prefix}phm_rule_left"], t[f"{prefix}phm_rule_right"])
        return t[f"{prefix}phm_rule"]

    def _projection(self, t: dict[str, torch.Tensor], site: str, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"{site}.{proj}."
        rule = self._rule(t, "" if self.shared_rule else p)
        w = t[f"{p}W"] if self.rank is None else torch.bmm(t[f"{p}W_left"], t[f"{p}W_right"])
        return phm_matrix(rule, w), t[f"{p}b"]


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, rule_std: float) -> torch.Tensor:
    """The paper's init (see the constants): rule ~ N(0, rule_std), each W_i slice glorot-uniform with gain
    sqrt(2) (bound = gain * sqrt(6 / (rows + cols)) of the 2-D slice), bias zero."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "b":
        return torch.zeros(shape)
    if leaf.startswith("phm_rule"):
        return torch.randn(shape, generator=gen) * rule_std
    bound = W_GAIN * (6.0 / (shape[1] + shape[2])) ** 0.5
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound
