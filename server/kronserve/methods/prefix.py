"""Prefix tuning (Li & Liang 2021) and MAM (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning"): per-layer key/value prefixes that an attention's queries attend to before the real tokens.

The native file keeps the *final* prefixes, never the reparameterization MLP that trained them:
`prefix.{site}.k` and `prefix.{site}.v`, each [P, heads·d_kv] (head-major, as T5 splits its keys), for every
attention site with a prefix (`encoder.{i}.mh`, `decoder.{i}.mh`, `decoder.{i}.cross`).

Where the two reference libraries differ, the spec says which one a prefix follows (`positions`):
- `adapterhub` (adapters 1.x on T5): prefix key j sits at memory position j and real key c at P + c, while a
  query keeps its own position, so a real token's relative-position bias is shifted by P and prefix key j gets
  the bias of distance j - q; cross-attention has no bias. The bias a stack's first layer computes is reused by its
  other layers, so a layer whose prefix presence differs from the first layer's (a `leave_out` layer) attends with an
  all-zero bias.
- `peft` (PEFT's PREFIX_TUNING): the prefix is P tokens before the sequence, so queries and real keys both move by
  P (their bias is unchanged) and prefix key j gets the bias of distance j - P - q.
MAM is a prefix plus the paper's scaled parallel adapter, as one adapter file (`mam`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ..errors import InvalidSpec
from .base import Geometry, MethodSpec
from .bottleneck import BottleneckSpec

Location = Literal["encoder", "decoder", "cross"]  # encoder self-attention, decoder self-attention, cross-attention
Positions = Literal["adapterhub", "peft"]
MAX_PREFIX = 1024

_SITE = {"encoder": ("encoder", "mh"), "decoder": ("decoder", "mh"), "cross": ("decoder", "cross")}
LOCATIONS = tuple(_SITE)


def location_of(site: str) -> str:
    """The location of an attention site: `encoder.1.mh` -> encoder, `decoder.0.mh` -> decoder, `decoder.0.cross`
    -> cross."""
    stack, _, kind = site.split(".")
    return "cross" if kind == "cross" else stack


def prefix_sites(geometry: Geometry, locations: tuple[str, ...], leave_out: tuple[int, ...]) -> list[str]:
    """The attention sites that get a prefix, in the backbone's site order."""
    wanted = {_SITE[loc] for loc in locations}
    return [
        s
        for s in geometry.all_sites()
        if (s.split(".")[0], s.rsplit(".", 1)[1]) in wanted and geometry.global_layer(s) not in leave_out
    ]


def prefix_shapes(geometry: Geometry, sites: list[str], length: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for site in sites:
        shapes[f"prefix.{site}.k"] = (length, geometry.d_attn)
        shapes[f"prefix.{site}.v"] = (length, geometry.d_attn)
    return shapes


def init_prefixes(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Small random keys and values: prefix tuning has no identity start (kronserve train reparameterizes)."""
    return {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}


def _unique(v: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(v)) != len(v):
        raise ValueError(f"repeats an entry: {list(v)}")
    return v


def _check_sites(geometry: Geometry, sites: list[str]) -> None:
    if not geometry.d_attn:
        raise InvalidSpec("prefix tuning needs the backbone's attention size (backbone fingerprint too old)")
    if not sites:
        raise InvalidSpec("prefix locations and leave_out leave no attention for this backbone")


class PrefixSpec(MethodSpec):
    family = "prefix"
    kernel = "prefix"

    method: Literal["prefix"]
    prefix_length: int = Field(ge=1, le=MAX_PREFIX)
    locations: tuple[Location, ...] = Field(min_length=1)
    positions: Positions = "adapterhub"

    @field_validator("locations")
    @classmethod
    def _unique_locations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v)

    def prefix_convention(self) -> str | None:
        return self.positions

    def prefix_sites(self, geometry: Geometry) -> list[str]:
        return prefix_sites(geometry, self.locations, self.leave_out)

    def check_geometry(self, geometry: Geometry) -> None:
        super().check_geometry(geometry)
        _check_sites(geometry, self.prefix_sites(geometry))

    def own_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return prefix_shapes(geometry, self.prefix_sites(geometry), self.prefix_length)

    def init_own(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return init_prefixes(self.own_shapes(geometry), gen)

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The final prefixes themselves, site by site (a site's k and v side by side: one gather per pass)."""
        return {name: tensors[name] for name in self.own_shapes(geometry)}


class MamSpec(BottleneckSpec):
    """A prefix on the attentions plus a bottleneck adapter (the paper's: parallel on the feed-forward, scaled).

    The adapter's fields are a bottleneck spec's (its `leave_out` too); the prefix's carry a `prefix_` name."""

    family = "mam"

    method: Literal["mam"]  # type: ignore[assignment]
    prefix_length: int = Field(ge=1, le=MAX_PREFIX)
    prefix_locations: tuple[Location, ...] = Field(min_length=1)
    prefix_positions: Positions = "adapterhub"
    prefix_leave_out: tuple[int, ...] = ()

    @field_validator("prefix_locations")
    @classmethod
    def _unique_locations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v)

    def prefix_convention(self) -> str | None:
        return self.prefix_positions

    def prefix_sites(self, geometry: Geometry) -> list[str]:
        return prefix_sites(geometry, self.prefix_locations, self.prefix_leave_out)

    def check_geometry(self, geometry: Geometry) -> None:
        super().check_geometry(geometry)
        total = geometry.num_layers + geometry.num_decoder_layers
        bad = [i for i in self.prefix_leave_out if not 0 <= i < total]
        if bad:
            raise InvalidSpec(f"prefix_leave_out has layer indices outside 0..{total - 1}: {bad}")
        _check_sites(geometry, self.prefix_sites(geometry))

    def own_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return {**super().own_shapes(geometry), **self._prefix_shapes(geometry)}

    def init_own(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {**super().init_own(geometry, gen), **init_prefixes(self._prefix_shapes(geometry), gen)}

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().compact_own(geometry, tensors)
        out.update({name: tensors[name] for name in self._prefix_shapes(geometry)})
        return out

    def _prefix_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return prefix_shapes(geometry, self.prefix_sites(geometry), self.prefix_length)
