"""PEFT LoRA saved directories (`adapter_config.json` with `peft_type: LORA` + `adapter_model.safetensors`).

Keys on T5: `base_model.model.{encoder|decoder}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention|
DenseReluDense}.{q|k|v|o|wi|wo}.lora_{A|B}.weight`. The native spec's targets and leave_out are read from
the keys present (so regex `target_modules` and `layers_to_transform` need no re-implementation); options
kronserve cannot honour are refused by name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from ..errors import InvalidAdapter, InvalidSpec
from ..methods import Geometry, LoraSpec, parse_spec

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<layer>\d+)\."
    r"(?:SelfAttention|EncDecAttention|DenseReluDense)\.(?P<proj>q|k|v|o|wi|wo)\.lora_(?P<ab>A|B)(?:\.default)?\.weight$"
)
_SITE = {"encoder": {0: "mh", 1: "ffn"}, "decoder": {0: "mh", 1: "cross", 2: "ffn"}}
_MUST_BE = {"use_dora": False, "fan_in_fan_out": False}
_MUST_BE_EMPTY = ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication")


def is_peft_config(cfg: dict[str, Any]) -> bool:
    return "peft_type" in cfg


def import_lora(cfg: dict[str, Any], state: dict[str, torch.Tensor], geometry: Geometry) -> tuple[LoraSpec, dict]:
    """The native LoRA spec and tensors of a PEFT LoRA adapter."""
    _check_options(cfg)
    tensors: dict[str, torch.Tensor] = {}
    kinds_by_layer: dict[int, set[str]] = defaultdict(set)
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidAdapter(f"unexpected key in a PEFT LoRA file for T5: {key}")
        site = _SITE[m["stack"]].get(int(m["layer"]))
        if site is None:
            raise InvalidAdapter(f"{key}: layer index {m['layer']} is not a T5 sublayer")
        name = f"{m['stack']}.{m['block']}.{site}.{m['proj']}"
        tensors[f"{name}.lora_{m['ab']}"] = tensor
        kinds_by_layer[geometry.global_layer(f"{m['stack']}.{m['block']}.{site}")].add(m["proj"])
    targets = sorted(set().union(*kinds_by_layer.values())) if kinds_by_layer else []
    if not targets:
        raise InvalidAdapter("the PEFT file holds no LoRA weights")
    uneven = {layer: sorted(k) for layer, k in kinds_by_layer.items() if k != set(targets)}
    if uneven:
        raise InvalidSpec(f"target_modules selects different projections in different layers: {uneven}")
    total = geometry.num_layers + geometry.num_decoder_layers
    spec = parse_spec(
        {
            "method": "lora",
            "rank": cfg.get("r", 8),
            "alpha": cfg.get("lora_alpha", 8),
            "targets": tuple(t for t in ("q", "k", "v", "o", "wi", "wo") if t in targets),
            "rslora": bool(cfg.get("use_rslora", False)),
            "leave_out": tuple(i for i in range(total) if i not in kinds_by_layer),
        }
    )
    assert isinstance(spec, LoraSpec)
    return spec, tensors


def _check_options(cfg: dict[str, Any]) -> None:
    if cfg.get("peft_type") != "LORA":
        raise InvalidSpec(f"PEFT peft_type={cfg.get('peft_type')!r} is not supported (LORA only)")
    for option, needed in _MUST_BE.items():
        if bool(cfg.get(option, needed)) != needed:
            raise InvalidSpec(f"PEFT option {option}={cfg[option]!r} is not supported (kronserve needs {needed})")
    if cfg.get("bias", "none") != "none":
        raise InvalidSpec(f"PEFT option bias={cfg['bias']!r} is not supported (kronserve needs 'none')")
    for option in _MUST_BE_EMPTY:
        if cfg.get(option):
            raise InvalidSpec(f"PEFT option {option}={cfg[option]!r} is not supported")
