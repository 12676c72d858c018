"""Training prefixes as the papers do: through a reparameterization MLP, never the prefixes directly.

Li & Liang (and AdapterHub's `PrefixTuning`, which the unified-view paper's MAM uses) train, per location, an
embedding `wte` [P, d_model] fed through Linear(d_model, b) -> tanh -> Linear(b, layers·2·heads·d_kv); optimizing
the prefixes directly is unstable. Only the MLP's output is kept: `finals()` gives it as the native file's
`prefix.{site}.k/.v`, the same form an AdapterHub or PEFT import produces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods import Geometry, MethodSpec
from ..methods.prefix import LOCATIONS, location_of


class PrefixReparam:
    def __init__(
        self, spec: MethodSpec, geometry: Geometry, bottleneck: int, gen: torch.Generator, device: torch.device
    ) -> None:
        sites = spec.prefix_sites(geometry)
        self.prefixed = frozenset(sites)
        self.length = spec.prefix_length  # type: ignore[attr-defined]
        self.width = geometry.d_attn
        by_location = {loc: [s for s in sites if location_of(s) == loc] for loc in LOCATIONS}
        self.sites = {loc: mine for loc, mine in by_location.items() if mine}
        self.params: dict[str, nn.Parameter] = {}
        for loc, mine in self.sites.items():
            out = len(mine) * 2 * self.width
            init = {
                "wte": torch.randn(self.length, geometry.d_model, generator=gen),  # nn.Embedding's N(0, 1)
                "w0": _uniform((bottleneck, geometry.d_model), gen),
                "b0": _uniform((bottleneck,), gen, geometry.d_model),
                "w2": _uniform((out, bottleneck), gen),
                "b2": _uniform((out,), gen, bottleneck),
            }
            for name, t in init.items():
                self.params[f"reparam.{loc}.{name}"] = nn.Parameter(t.to(device))

    def output(self, location: str) -> torch.Tensor:
        """[P, layers·2, heads·d_kv]: layer k of the location takes rows 2k (keys) and 2k + 1 (values)."""
        p = {name: self.params[f"reparam.{location}.{name}"] for name in ("wte", "w0", "b0", "w2", "b2")}
        h = torch.tanh(p["wte"] @ p["w0"].T + p["b0"])
        return (h @ p["w2"].T + p["b2"]).view(self.length, -1, self.width)

    def site(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One site's (keys, values), each [P, heads·d_kv], differentiable in the MLP."""
        location = location_of(site)
        k = self.sites[location].index(site)
        out = self.output(location)
        return out[:, 2 * k], out[:, 2 * k + 1]

    def finals(self) -> dict[str, torch.Tensor]:
        """The native file's prefixes, computed once from the current MLP (detached, CPU)."""
        tensors = {}
        with torch.no_grad():
            for location, mine in self.sites.items():
                out = self.output(location).to("cpu")
                for k, site in enumerate(mine):
                    tensors[f"prefix.{site}.k"] = out[:, 2 * k].clone()
                    tensors[f"prefix.{site}.v"] = out[:, 2 * k + 1].clone()
        return tensors


def _uniform(shape: tuple[int, ...], gen: torch.Generator, fan_in: int | None = None) -> torch.Tensor:
    """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in: the weight's second dimension)."""
    bound = 1 / math.sqrt(fan_in or shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound
