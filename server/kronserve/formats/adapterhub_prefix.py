"""AdapterHub prefix tuning and MAM (`"architecture": "prefix_tuning"`, or `"union"` of a prefix and a
bottleneck) -> the native `prefix` / `mam` spec with final per-layer prefixes.

AdapterHub keeps one prefix module per location (`encoder_prefix`: encoder self-attention, `self_prefix`: decoder
self-attention, `cross_prefix`: cross-attention) under `[...]prefix_tunings.<name>.<location>.`:
- reparameterized: `wte.weight` [P, d] -> `control_trans.0` (Linear d -> bottleneck) -> non_linearity ->
  `control_trans.2` (Linear -> n_layers·2·H·d_kv); `PrefixTuning.eject` computes the same once;
- flat (`flat: true`, or an ejected save): `control_trans` [P·n_layers·2·H·d_kv] holds the result itself.
Either way the output is viewed [P, n_layers·2, H, d_kv] and the k-th layer of the location that has a prefix
(leave_out layers skipped, in block order) takes rows 2k (keys) and 2k+1 (values). Which form a file holds is
read from its keys, whatever its config says. The final prefixes are computed here, once, at import.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidAdapter, InvalidSpec
from ..methods import Geometry, MethodSpec, parse_spec
from ..methods.prefix import LOCATIONS, location_of
from . import adapterhub

_KEY = re.compile(
    r"^(?:.*\.)?prefix_tunings\.(?P<name>[^.]+)\.(?P<location>encoder_prefix|self_prefix|cross_prefix)\."
    r"(?P<leaf>wte\.weight|control_trans\.[02]\.(?:weight|bias)|control_trans)$"
)
_LOCATION = {"encoder_prefix": "encoder", "self_prefix": "decoder", "cross_prefix": "cross"}
_NON_LINEARITY = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda h: F.gelu(h, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
}
_NEUTRAL = frozenset(
    {"architecture", "encoder_prefix", "cross_prefix", "leave_out", "flat", "prefix_length", "bottleneck_size",
     "non_linearity", "dropout", "shared_gating", "init_weights_seed"}
)  # fmt: skip


def is_prefix_config(cfg: dict[str, Any]) -> bool:
    return cfg["config"].get("architecture") in ("prefix_tuning", "union")


def import_prefix(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], geometry: Geometry
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The native `prefix` (or `mam`) spec and tensors of an AdapterHub prefix-tuning (or MAM union) save."""
    c = cfg["config"]
    if c.get("architecture") == "union":
        return _import_union(cfg, state, geometry)
    prefix = _prefix_fields(c)
    spec = parse_spec({"method": "prefix", **prefix})
    return spec, _final_prefixes(c, state, geometry, spec.prefix_sites(geometry), _name(cfg, state))


def _import_union(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], geometry: Geometry
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """MAM: a prefix plus a bottleneck adapter (AdapterHub's `MAMConfig`, or any union of exactly those two)."""
    parts = cfg["config"].get("configs")
    kinds = sorted(str(p.get("architecture", "bottleneck")) for p in parts) if isinstance(parts, list) else []
    if kinds != ["bottleneck", "prefix_tuning"]:
        raise InvalidSpec(f"AdapterHub union of {kinds or parts!r} is not supported (a prefix and a bottleneck: MAM)")
    pc = next(p for p in parts if p.get("architecture") == "prefix_tuning")
    bc = next(p for p in parts if p.get("architecture", "bottleneck") == "bottleneck")
    bottleneck = adapterhub.spec_from_config({**cfg, "config": {**bc, "architecture": "bottleneck"}})
    if bottleneck.family != "bottleneck":
        raise InvalidSpec("AdapterHub MAM with a PHM (Compacter) adapter is not supported: a bottleneck adapter only")
    prefix = {k if k == "prefix_length" else f"prefix_{k}": v for k, v in _prefix_fields(pc).items()}
    fields = bottleneck.model_dump(exclude={"method"})
    spec = parse_spec({"method": "mam", **fields, **prefix})
    name = _name(cfg, state)
    tensors = adapterhub.tensors_from_state(bottleneck, {**cfg, "name": name}, state)
    tensors.update(_final_prefixes(pc, state, geometry, spec.prefix_sites(geometry), name))
    return spec, tensors


def _prefix_fields(c: dict[str, Any]) -> dict[str, Any]:
    """The native prefix fields of a PrefixTuningConfig, or InvalidSpec naming an option kronserve cannot honour."""
    if c.get("use_gating"):
        raise InvalidSpec("AdapterHub option use_gating=True is not supported for prefix tuning (UniPELT's gates)")
    unknown = sorted(k for k, v in c.items() if k not in _NEUTRAL and k != "use_gating" and v not in (None, False))
    if unknown:
        raise InvalidSpec(f"AdapterHub prefix-tuning option {unknown[0]}={c[unknown[0]]!r} is not supported")
    locations = ["decoder"]
    if c.get("encoder_prefix", True):
        locations.insert(0, "encoder")
    if c.get("cross_prefix", True):
        locations.append("cross")
    return {
        "prefix_length": c.get("prefix_length", 30),
        "locations": tuple(locations),
        "positions": "adapterhub",
        "leave_out": tuple(int(i) for i in c.get("leave_out") or ()),
    }


def _name(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    names = {m["name"] for k in state if (m := _KEY.match(k))}
    if cfg.get("name") in names:
        return str(cfg["name"])
    if len(names) == 1:
        return names.pop()
    raise InvalidAdapter(f"cannot tell which prefix to import: weights hold {sorted(names) or 'none'}")


def _final_prefixes(
    c: dict[str, Any], state: dict[str, torch.Tensor], geometry: Geometry, sites: list[str], name: str
) -> dict[str, torch.Tensor]:
    """`prefix.{site}.k/.v` [P, H·d_kv] for every site with a prefix, from each location's module."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if (m := _KEY.match(key)) and m["name"] == name:
            found = modules.setdefault(_LOCATION[m["location"]], {})
            if m["leaf"] in found and not torch.equal(found[m["leaf"]], tensor):
                raise InvalidAdapter(f"{key}: two copies of this prefix weight differ")
            found[m["leaf"]] = tensor
    length = int(c.get("prefix_length", 30))
    out: dict[str, torch.Tensor] = {}
    for location in LOCATIONS:
        mine = [s for s in sites if location_of(s) == location]
        if not mine:
            continue
        if location not in modules:
            raise InvalidAdapter(f"the file has no {location} prefix ({_inverse(location)}) for {name!r}")
        output = _location_output(modules[location], c, location)
        needed = length * len(mine) * 2 * geometry.d_attn
        if output.numel() != needed:
            raise InvalidAdapter(
                f"the {_inverse(location)} prefix holds {output.numel()} numbers; prefix_length {length} on "
                f"{len(mine)} layers of attention width {geometry.d_attn} needs {needed}"
            )
        flat = output.reshape(length, len(mine) * 2, geometry.d_attn)
        for k, site in enumerate(mine):
            out[f"prefix.{site}.k"], out[f"prefix.{site}.v"] = flat[:, 2 * k].clone(), flat[:, 2 * k + 1].clone()
    return out


def _location_output(module: dict[str, torch.Tensor], c: dict[str, Any], location: str) -> torch.Tensor:
    """One location's prefix output [P, n_layers·2·H·d_kv] (flat), computed from its MLP if it has one."""
    if "control_trans" in module:
        return module["control_trans"].float()
    needed = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight")
    missing = [leaf for leaf in (*needed, "control_trans.2.bias") if leaf not in module]
    if missing:
        raise InvalidAdapter(f"the {_inverse(location)} prefix lacks {missing}")
    act_name = str(c.get("non_linearity", "tanh")).lower()
    if act_name not in _NON_LINEARITY:
        raise InvalidSpec(f"AdapterHub prefix non_linearity={act_name!r} is not supported ({sorted(_NON_LINEARITY)})")
    m = {k: v.double() for k, v in module.items()}
    with torch.no_grad():
        h = _NON_LINEARITY[act_name](m["wte.weight"] @ m["control_trans.0.weight"].T + m["control_trans.0.bias"])
        return (h @ m["control_trans.2.weight"].T + m["control_trans.2.bias"]).float()


def _inverse(location: str) -> str:
    return next(k for k, v in _LOCATION.items() if v == location)
