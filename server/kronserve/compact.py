"""An adapter in the form the tiers keep: one flat tensor of its compact parts, and the layout that names them.

`MethodSpec.compact` says what a method keeps (PHM: its factors; bottlenecks: down/up per used site;
LoRA: A/B per targeted projection at its own rank). Here those parts are packed into one contiguous
buffer in the serving dtype: the host tier holds that buffer, and a device pool row is a copy of it, so
a device load is one copy and an adapter costs its own bytes. Adapters whose layouts are equal (same
method options, sites and shapes) share a pool and are gathered per row by one `index_select` per part.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .errors import InvalidAdapter
from .formats.native import AdapterFile
from .methods import Geometry, MethodSpec


@dataclass(frozen=True)
class Part:
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Layout:
    """What one pool's rows hold: the kernel that reads them, its options, and each part's place in the row."""

    kernel: str  # "bottleneck", "phm", "lora" or "prefix" (prefixes alone)
    activation: str | None
    placement: str | None
    positions: str | None  # how prefix positions count ("adapterhub" or "peft"; methods/prefix.py), None: no prefix
    parts: dict[str, Part] = field(repr=False)
    numel: int
    sites: frozenset[str]  # sites with an adapter (bottleneck and PHM kernels)
    linears: frozenset[str]  # projections with a LoRA update
    norms: bool  # per-task layer norms
    spans: dict[str, Part] = field(repr=False)  # site or projection -> the contiguous run of all its parts
    owner: dict[str, str] = field(repr=False)  # part -> its site or projection (shared parts and norms: none)
    members: dict[str, tuple[str, ...]] = field(repr=False)  # site or projection -> its parts
    prefixes: frozenset[str] = frozenset()  # attention sites with a key/value prefix
    prefix_length: int = 0


@functools.cache
def layout_of(
    kernel: str, activation: str | None, placement: str | None, shapes: tuple, positions: str | None = None
) -> Layout:
    """One Layout object per distinct layout (interned, so pools are found by identity)."""
    parts, offset = {}, 0
    for name, shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        parts[name] = Part(offset, numel, shape)
        offset += numel
    ends = {"bottleneck": ".down_b", "phm": ".down.b", "lora": ".A", "prefix": None}[kernel]
    used = frozenset(name[: -len(ends)] for name in parts if ends and name.endswith(ends))
    sites, linears = (frozenset(), used) if kernel == "lora" else (used, frozenset())
    prefixed = frozenset(name[7:-2] for name in parts if name.startswith("prefix.") and name.endswith(".k"))
    length = next((parts[f"prefix.{s}.k"].shape[0] for s in prefixed), 0)
    used = used | {f"prefix.{s}" for s in prefixed}
    norms = any(name.startswith("layer_norm.") for name in parts)
    owner = {name: key for name in parts for key in (name.rsplit(".", 2)[0], name.rsplit(".", 1)[0]) if key in used}
    spans = {}
    for key in used:
        mine = [parts[name] for name, k in owner.items() if k == key]
        start, end = min(p.offset for p in mine), max(p.offset + p.numel for p in mine)
        if end - start == sum(p.numel for p in mine):  # contiguous (as `MethodSpec.compact` emits them)
            spans[key] = Part(start, end - start, (end - start,))
    owner = {name: key for name, key in owner.items() if key in spans}
    members = {key: tuple(name for name, k in owner.items() if k == key) for key in spans}
    return Layout(
        kernel,
        activation,
        placement,
        positions,
        parts,
        offset,
        sites,
        linears,
        norms,
        spans,
        owner,
        members,
        prefixed,
        length,
    )


@dataclass(frozen=True, eq=False)
class Compact:
    layout: Layout
    flat: torch.Tensor  # [layout.numel], serving dtype, CPU

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def compact(adapter: AdapterFile, dtype: torch.dtype) -> Compact:
    """Pack a validated adapter; a part that is not finite in `dtype` (float16 overflow) is refused, naming it."""
    spec = adapter.spec
    parts = spec.compact(adapter.geometry, adapter.tensors)
    flat = torch.cat([t.reshape(-1) for t in parts.values()]).to(dtype)
    if not torch.isfinite(flat).all():
        bad = next(n for n, t in parts.items() if not torch.isfinite(t.to(dtype)).all())
        raise InvalidAdapter(f"{bad}: the adapter's weights are not finite in {dtype}")
    shapes = tuple((name, tuple(t.shape)) for name, t in parts.items())
    activation, placement = getattr(spec, "activation", None), getattr(spec, "placement", None)
    layout = layout_of(spec.kernel, activation, placement, shapes, spec.prefix_convention())
    return Compact(layout, flat)


@functools.cache
def packed_bytes(spec: MethodSpec, geometry: Geometry, dtype: torch.dtype) -> int:
    """What `compact` would make of an adapter of `spec`, in bytes, without its tensors (meta tensors)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in spec.tensor_shapes(geometry).items()}
    numel = sum(t.numel() for t in spec.compact(geometry, meta).values())
    return numel * torch.empty((), dtype=dtype).element_size()
