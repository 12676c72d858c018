"""The method table: each method name maps to its spec class and the defaults of its paper.

Adding a method = a module with a spec (shapes, init, dense form) + one line in METHODS.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, TypeAdapter, ValidationError

from ..errors import InvalidSpec
from .base import AdapterSpec, DenseAdapter, Geometry
from .bottleneck import BottleneckSpec
from .phm import PHMSpec

_COMPACTER = dict(placement="houlsby", reduction_factor=32, activation="gelu_new", phm_dim=4, rank=1)

METHODS: dict[str, tuple[type[AdapterSpec], dict[str, Any]]] = {
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
}

AnySpec = Annotated[PHMSpec | BottleneckSpec, Field(discriminator="method")]
_SPEC_ADAPTER: TypeAdapter[AdapterSpec] = TypeAdapter(AnySpec)


def preset(method: str, **overrides: Any) -> AdapterSpec:
    """The paper's configuration of `method`, with `overrides` (None values ignored)."""
    if method not in METHODS:
        raise InvalidSpec(f"unknown method {method!r}; known: {sorted(METHODS)}")
    cls, defaults = METHODS[method]
    fields = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_spec({"method": method, **fields}, cls=cls)


def parse_spec(data: dict[str, Any], cls: type[AdapterSpec] | None = None) -> AdapterSpec:
    """Validate a spec dict; the error names each bad field."""
    try:
        return cls.model_validate(data) if cls else _SPEC_ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise InvalidSpec(f"invalid adapter spec: {problems}") from e


def init_tensors(
    spec: AdapterSpec,
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
        out = spec.init_shared(geometry, gen)
        site_shapes = spec.site_shapes(geometry)
        for site in spec.active_sites(geometry):
            out.update({f"{site}.{k}": v for k, v in spec.init_site(site_shapes, gen).items()})
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
    "PHMSpec",
    "init_tensors",
    "parse_spec",
    "preset",
]
