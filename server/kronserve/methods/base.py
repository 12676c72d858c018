"""What every adapter method shares: the T5 geometry it is laid on, site and norm names, the spec base.

A *site* is a sublayer output where an adapter acts: `mh` (self-attention), `cross` (decoder
cross-attention) and `ffn` (feed-forward) of each block. Sites are named `{stack}.{block}.{kind}`,
e.g. `decoder.3.ffn`; a task's per-site tensors are prefixed with that name. Per-task T5 layer norms
are named `layer_norm.{stack}.{block}.{kind}` and `layer_norm.{stack}.final`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import InvalidSpec

SiteKind = Literal["mh", "cross", "ffn"]
Placement = Literal["houlsby", "pfeiffer", "parallel"]
Activation = Literal["gelu", "gelu_new", "relu", "swish"]

ENCODER_KINDS: tuple[SiteKind, ...] = ("mh", "ffn")
DECODER_KINDS: tuple[SiteKind, ...] = ("mh", "cross", "ffn")


LinearKind = Literal["q", "k", "v", "o", "wi", "wo"]
ATTENTION_LINEARS: tuple[LinearKind, ...] = ("q", "k", "v", "o")
FFN_LINEARS: tuple[LinearKind, ...] = ("wi", "wo")


@dataclass(frozen=True)
class Geometry:
    """The backbone numbers a spec's shapes depend on (`d_attn` = heads x d_kv; 0 where unknown)."""

    d_model: int
    num_layers: int
    num_decoder_layers: int
    d_ff: int = 0
    d_attn: int = 0

    def all_linears(self) -> list[str]:
        """Every projection LoRA can target, `{stack}.{block}.{mh|cross|ffn}.{q|k|v|o|wi|wo}`, in a fixed order."""
        out = []
        for site in self.all_sites():
            kinds = FFN_LINEARS if site.endswith(".ffn") else ATTENTION_LINEARS
            out += [f"{site}.{k}" for k in kinds]
        return out

    def linear_shape(self, linear: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        kind = linear.rsplit(".", 1)[1]
        d, a, f = self.d_model, self.d_attn, self.d_ff
        return {"q": (d, a), "k": (d, a), "v": (d, a), "o": (a, d), "wi": (d, f), "wo": (f, d)}[kind]

    def all_sites(self) -> list[str]:
        """Every site the backbone has, in a fixed order (the plan's site index)."""
        enc = [f"encoder.{i}.{k}" for i in range(self.num_layers) for k in ENCODER_KINDS]
        dec = [f"decoder.{i}.{k}" for i in range(self.num_decoder_layers) for k in DECODER_KINDS]
        return enc + dec

    def all_norms(self) -> list[str]:
        """Every T5 RMSNorm, in a fixed order (the plan's norm index)."""
        return (
            [f"layer_norm.{s}" for s in self.all_sites() if s.startswith("encoder")]
            + ["layer_norm.encoder.final"]
            + [f"layer_norm.{s}" for s in self.all_sites() if s.startswith("decoder")]
            + ["layer_norm.decoder.final"]
        )

    def global_layer(self, site: str) -> int:
        """AdapterHub's `leave_out` numbering: encoder 0..L-1, decoder L..L+Ld-1."""
        stack, block, _ = site.split(".")
        return int(block) + (self.num_layers if stack == "decoder" else 0)


@dataclass(frozen=True)
class DenseAdapter:
    """One site's adapter as plain matrices: `A(z) = act(z @ down_w + down_b) @ up_w + up_b`.

    Shapes: down_w [d, k], down_b [k], up_w [k, d], up_b [d]; `scaling` already folded into up_*.
    """

    down_w: torch.Tensor
    down_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor


class MethodSpec(BaseModel):
    """What every method's spec has: a name, layers left out, optional per-task norms, its tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    leave_out: tuple[int, ...] = ()
    layer_norms: bool = False

    family: ClassVar[str]
    kernel: ClassVar[str]  # which plan computation serves it: "bottleneck", "phm" or "lora" (see compact.py)

    def compact(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a device keeps to serve this adapter, named as the plan reads them (scaling folded in).

        Only the sites and projections the adapter uses appear, so an adapter costs its own size whatever
        else is loaded; per-task norms keep their file names.
        """
        out = self.compact_own(geometry, tensors)
        if self.layer_norms:
            out.update({name: tensors[name] for name in geometry.all_norms()})
        return out

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prefix_convention(self) -> str | None:
        """How a prefix's positions count (methods/prefix.py), or None for a method without prefixes."""
        return None

    def prefix_sites(self, geometry: Geometry) -> list[str]:
        """The attention sites with a key/value prefix (methods/prefix.py)."""
        return []

    def check_geometry(self, geometry: Geometry) -> None:
        total = geometry.num_layers + geometry.num_decoder_layers
        bad = [i for i in self.leave_out if not 0 <= i < total]
        if bad:
            raise InvalidSpec(f"leave_out has layer indices outside 0..{total - 1}: {bad}")

    def tensor_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        """Every tensor a file of this spec holds, with its shape (computed once per spec and backbone: registering
        100,000 stored versions asks it for each)."""
        return dict(_tensor_shapes(self, geometry))

    def param_count(self, geometry: Geometry) -> int:
        return _param_count(self, geometry)

    def own_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init_own(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The method's own initialization of its tensors (layer norms aside)."""
        raise NotImplementedError


class AdapterSpec(MethodSpec):
    """Bottleneck-shaped adapters at sublayer outputs. Subclasses add their fields, shapes, init and dense form."""

    placement: Placement
    sites: tuple[SiteKind, ...] = Field(min_length=1)
    reduction_factor: int = Field(ge=1)
    activation: Activation
    scaling: float = Field(default=1.0, allow_inf_nan=False, ge=-1e4, le=1e4)

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"sites repeat an entry: {list(v)}")
        return v

    kernel: ClassVar[str] = "bottleneck"

    def bottleneck(self, geometry: Geometry) -> int:
        return geometry.d_model // self.reduction_factor

    def compact_own(self, geometry: Geometry, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each used site's dense bottleneck: `{site}.down_w` [d, k], `.down_b`, `.up_w` [k, d], `.up_b`."""
        out = {}
        for site in self.active_sites(geometry):
            a = self.dense(tensors, site)
            out.update({f"{site}.down_w": a.down_w, f"{site}.down_b": a.down_b})
            out.update({f"{site}.up_w": a.up_w, f"{site}.up_b": a.up_b})
        return out

    def check_geometry(self, geometry: Geometry) -> None:
        """Raise InvalidSpec naming the field that does not fit this backbone."""
        super().check_geometry(geometry)
        d = geometry.d_model
        if d % self.reduction_factor:
            raise InvalidSpec(f"reduction_factor {self.reduction_factor} does not divide d_model {d}")
        if not self.active_sites(geometry):
            raise InvalidSpec("sites and leave_out leave no site for this backbone")

    def active_sites(self, geometry: Geometry) -> list[str]:
        """The sites this adapter acts at, in the backbone's site order."""
        return [
            s
            for s in geometry.all_sites()
            if s.rsplit(".", 1)[1] in self.sites and geometry.global_layer(s) not in self.leave_out
        ]

    def own_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        shapes = self.shared_shapes(geometry)
        for site in self.active_sites(geometry):
            shapes.update({f"{site}.{k}": v for k, v in self.site_shapes(geometry).items()})
        return shapes

    def init_own(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = self.init_shared(geometry, gen)
        site_shapes = self.site_shapes(geometry)
        for site in self.active_sites(geometry):
            out.update({f"{site}.{k}": v for k, v in self.init_site(site_shapes, gen).items()})
        return out

    # Per-family parts.
    def shared_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return {}

    def site_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init_site(self, shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The method's own initialization of one site's tensors (keys without the site prefix)."""
        raise NotImplementedError

    def init_shared(self, geometry: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def dense(self, tensors: dict[str, torch.Tensor], site: str) -> DenseAdapter:
        """Materialize `site`'s adapter from the file's tensors (full names)."""
        raise NotImplementedError


@functools.lru_cache(maxsize=1024)
def _tensor_shapes(spec: MethodSpec, geometry: Geometry) -> dict[str, tuple[int, ...]]:
    """Read-only: `MethodSpec.tensor_shapes` hands out copies."""
    shapes = spec.own_shapes(geometry)
    if spec.layer_norms:
        shapes.update({n: (geometry.d_model,) for n in geometry.all_norms()})
    return shapes


@functools.lru_cache(maxsize=1024)
def _param_count(spec: MethodSpec, geometry: Geometry) -> int:
    return sum(_numel(s) for s in _tensor_shapes(spec, geometry).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
