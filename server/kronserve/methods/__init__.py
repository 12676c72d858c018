"""The method table: each method name maps to its spec class and the defaults of its paper.

Adding a method = a module with a spec (shapes, init, dense form) + one line in METHODS.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, TypeAdapter, ValidationError

from ..errors import InvalidSpec
from .base import AdapterSpec, DenseAdapter, Geometry, MethodSpec
from .bottleneck import BottleneckSpec
from .lora import LoraSpec
from .phm import PHMSpec
from .prefix import MamSpec, PrefixSpec

PAPER_PHM_DIM = 12  # PHM-Adapter's n in the paper's configs (see preset)
_COMPACTER = dict(placement="houlsby", reduction_factor=32, activation="gelu_new", phm_dim=4, rank=1)

METHODS: dict[str, tuple[type[MethodSpec], dict[str, Any]]] = {
    "compacter": (PHMSpec, dict(_COMPACTER, sites=("mh", "ffn"))),
    "compacter++": (PHMSpec, dict(_COMPACTER, sites=("ffn",))),
    "phm": (PHMSpec, dict(_COMPACTER, sites=("mh", "ffn"), rank=None, shared_rule=False)),
    "houlsby": (
        BottleneckSpec,
        dict(placement="houlsby", sites=("mh", "ffn"), reduction_factor=16, activation="swish"),
    ),
    "pfeiffer": (
        BottleneckSpec,
        dict(placement="pfeiffer", sites=("ffn",), reduction_factor=16, activation="relu"),
    ),
    "lora": (LoraSpec, dict(rank=8, alpha=8.0, targets=("q", "v"))),  # PEFT's defaults on T5
    # The unified-view paper's settings: prefix length 30 on all three attentions (AdapterHub's defaults too) ...
    "prefix": (PrefixSpec, dict(prefix_length=30, locations=("encoder", "decoder", "cross"))),
    # ... and MAM: that prefix plus a parallel adapter reading the feed-forward's input, scale 4, ReLU, bottleneck
    # d_model / 2 (the paper's r 512 on BART-large's 1024; AdapterHub's MAMConfig uses ParBnConfig, reduction 2).
    "mam": (
        MamSpec,
        dict(
            placement="parallel",
            sites=("ffn",),
            reduction_factor=2,
            activation="relu",
            scaling=4.0,
            prefix_length=30,
            prefix_locations=("encoder", "decoder", "cross"),
        ),
    ),
}

AnySpec = Annotated[PHMSpec | BottleneckSpec | LoraSpec | PrefixSpec | MamSpec, Field(discriminator="method")]
_SPEC_ADAPTER: TypeAdapter[MethodSpec] = TypeAdapter(AnySpec)


def preset(method: str, geometry: Geometry | None = None, **overrides: Any) -> MethodSpec:
    """The paper's configuration of `method`, with `overrides` (None values ignored).

    With the backbone's `geometry`, the PHM-Adapter takes the paper's n = 12 (rabeehk/compacter
    `seq2seq/configs/phm_adapters.json`, hypercomplex_division 12) where 12 divides d_model and the bottleneck,
    else the largest n below it that does (t5-base: 12; t5-small at reduction 32: 8).
    """
    if method not in METHODS:
        raise InvalidSpec(f"unknown method {method!r}; known: {sorted(METHODS)}")
    cls, defaults = METHODS[method]
    fields = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    if method == "phm" and overrides.get("phm_dim") is None and geometry is not None:
        fields["phm_dim"] = _paper_phm_dim(geometry.d_model, fields["reduction_factor"])
    return parse_spec({"method": method, **fields}, cls=cls)


def _paper_phm_dim(d_model: int, reduction_factor: int) -> int:
    bottleneck = max(d_model // reduction_factor, 1)
    return next(n for n in range(PAPER_PHM_DIM, 0, -1) if d_model % n == 0 and bottleneck % n == 0)


def parse_spec(data: dict[str, Any], cls: type[MethodSpec] | None = None) -> MethodSpec:
    """Validate a spec dict; the error names each bad field."""
    try:
        return cls.model_validate(data) if cls else _SPEC_ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise InvalidSpec(f"invalid adapter spec: {problems}") from e


def init_tensors(
    spec: MethodSpec,
    geometry: Geometry,
    seed: int = 0,
    std: float | None = None,
    base_norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A new adapter's tensors: the method's paper init, or every weight ~ N(0, std) when std is given.

    Per-task layer norms start as the backbone's (`base_norms`), plus N(0, std) noise when std is given.
    """
    spec.check_geometry(geometry)
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.tensor_shapes(geometry)
    if std is not None:
        out = {n: torch.randn(s, generator=gen) * std for n, s in shapes.items() if not n.startswith("layer_norm.")}
    else:
        out = spec.init_own(geometry, gen)
    if spec.layer_norms:
        if base_norms is None:
            raise InvalidSpec("layer_norms needs the backbone's norm weights to start from")
        for name in geometry.all_norms():
            noise = torch.randn(geometry.d_model, generator=gen) * std if std is not None else 0.0
            out[name] = base_norms[name].float() + noise
    return out


__all__ = [
    "METHODS",
    "AdapterSpec",
    "BottleneckSpec",
    "DenseAdapter",
    "Geometry",
    "LoraSpec",
    "MamSpec",
    "MethodSpec",
    "PHMSpec",
    "PrefixSpec",
    "init_tensors",
    "parse_spec",
    "preset",
]
