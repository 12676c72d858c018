"""The plan the routed sites call while training: the adapter's own tensors, differentiable."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ACTIVATIONS
from ..methods import AdapterSpec, Geometry, LoraSpec, MethodSpec
from ..plan import PrefixRows, prefix_rule
from .prefix_reparam import PrefixReparam

PREFIX_BOTTLENECK = {"prefix": 512, "mam": 800}  # AdapterHub's PrefixTuningConfig and MAMConfig MLP widths


class TrainablePlan:
    """The `SitePlan` for one task on every row, differentiable in the adapter's tensors.

    `params` holds the native file's tensors by their native names, as float32 leaves. `spec.dense`
    (`spec.low_rank` for LoRA) turns them into each site's weights on every call, as serving does on
    load, so the gradient reaches the stored form (PHM rule and factors, not a materialized matrix)
    and nothing needs converting before `save`. Prefixes are the exception: they train through their
    reparameterization MLP (`PrefixReparam`), and `snapshot` computes the native prefixes from it.
    """

    def __init__(
        self,
        spec: MethodSpec,
        geometry: Geometry,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.params = {
            n: nn.Parameter(t.detach().to(device, torch.float32).clone())
            for n, t in tensors.items()
            if not n.startswith("prefix.")
        }
        self._prefixes: PrefixReparam | None = None
        self._attention, self._device = geometry.all_sites(), device
        if spec.prefix_convention() is not None:
            gen = torch.Generator().manual_seed(seed)
            self._prefixes = PrefixReparam(spec, geometry, PREFIX_BOTTLENECK[spec.method], gen, device)
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

    def prefix_at(self, site: int, rows: int) -> PrefixRows | None:
        """Every row's prefix at `site`, computed by the MLP on each call (so each pass's gradient reaches it)."""
        reparam, convention = self._prefixes, self.spec.prefix_convention()
        if reparam is None or convention is None:
            return None
        name = self._attention[site]
        rule = prefix_rule(convention, name, reparam.prefixed, reparam.length)
        if not (rule.has or rule.zero_bias):
            return None
        keys, values = (t[None] for t in reparam.site(name)) if rule.has else (None, None)
        return PrefixRows.alike(rows, keys, values, rule, self._device)

    def parameters(self) -> list[nn.Parameter]:
        reparam = [] if self._prefixes is None else list(self._prefixes.params.values())
        return list(self.params.values()) + reparam

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The native file's tensors as detached CPU copies, so keeping the best epoch survives later optimizer
        steps (prefixes: the MLP's current output)."""
        out = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        if self._prefixes is not None:
            out.update(self._prefixes.finals())
        return out


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
