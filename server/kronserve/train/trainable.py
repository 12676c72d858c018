"""The plan the routed sites call while training: the adapter's own tensors, differentiable."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ACTIVATIONS
from ..methods import AdapterSpec, Geometry, LoraSpec, MethodSpec


class TrainablePlan:
    """The `SitePlan` for one task on every row, differentiable in the adapter's tensors.

    `params` holds the native file's tensors by their native names, as float32 leaves. `spec.dense`
    (`spec.low_rank` for LoRA) turns them into each site's weights on every call, as serving does on
    load, so the gradient reaches the stored form (PHM rule and factors, not a materialized matrix)
    and nothing needs converting before `save`.
    """

    def __init__(
        self, spec: MethodSpec, geometry: Geometry, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        self.spec = spec
        self.params = {n: nn.Parameter(t.detach().to(device, torch.float32).clone()) for n, t in tensors.items()}
        self._sites = _indexed(
            geometry.all_sites(), spec.active_sites(geometry) if isinstance(spec, AdapterSpec) else []
        )
        self._linears = _indexed(
            geometry.all_linears(), spec.active_linears(geometry) if isinstance(spec, LoraSpec) else []
        )
        self._norms = geometry.all_norms()
        self.use_norms = spec.layer_norms

    def acts_at(self, site: int) -> bool:
        return site in self._sites

    def delta(self, site: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        assert isinstance(spec, AdapterSpec)  # only bottleneck specs have sites
        a = spec.dense(self.params, self._sites[site])
        z = adapter_input(spec.placement, x, f).to(torch.float32)
        out = ACTIVATIONS[spec.activation](z @ a.down_w + a.down_b) @ a.up_w + a.up_b
        return out.to(x.dtype)

    def lora_acts_at(self, linear: int) -> bool:
        return linear in self._linears

    def lora_delta(self, linear: int, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        assert isinstance(spec, LoraSpec)  # only LoRA specs have projections
        a, b = spec.low_rank(self.params, self._linears[linear])
        return (x.to(torch.float32) @ a @ b).to(x.dtype)

    def norm_weight(self, norm: int) -> torch.Tensor:
        """The task's weight as [1, 1, d]: every row is the same task, so it broadcasts."""
        return self.params[self._norms[norm]].view(1, 1, -1)

    def prefix_at(self, site: int, rows: int) -> None:
        return None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies, so keeping the best epoch survives later optimizer steps."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}


def _indexed(order: list[str], names: list[str]) -> dict[int, str]:
    """Position in the backbone's fixed order (what the installed modules pass) -> name in the file."""
    index = {name: i for i, name in enumerate(order)}
    return {index[n]: n for n in names}


def adapter_input(placement: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """What the adapter reads, as serving defines it: Houlsby the sublayer output, Pfeiffer the sum, parallel x."""
    match placement:
        case "houlsby":
            return f
        case "pfeiffer":
            return x + f
        case "parallel":
            return x
    raise ValueError(f"unknown placement {placement!r}")
