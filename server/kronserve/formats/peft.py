"""PEFT saved directories (`adapter_config.json` with `peft_type` + `adapter_model.safetensors`): LoRA and
prefix tuning (at the end of this module).

Keys on T5: `base_model.model.{encoder|decoder}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention|
DenseReluDense}.{q|k|v|o|wi|wo}.lora_{A|B}.weight`. The native spec's targets and leave_out are read from
the keys present (so regex `target_modules` and `layers_to_transform` need no re-implementation).

The config is read as an allow-list: every field PEFT 0.21's `LoraConfig` writes (peft `tuners/lora/config.py`,
`config.py` `PeftConfig`) is either neutral (it never changes the computation once trained: bookkeeping,
dropout, what to target, how to initialise plain LoRA) or must hold the one value that is plain LoRA
(`_PLAIN`). A field kronserve does not know is refused by name unless it is off in PEFT's own convention
(null, false or empty: how every LoRA variant and extra is disabled), so a newer PEFT's save of a plain
adapter still loads.
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
# init_lora_weights values whose factors act on the unmodified base weights. PiSSA, OLoRA, CorDA, LoRA-GA and
# LoftQ rewrite the base weights at init (a save converted with `path_initial_model_for_weight_conversion` says
# `true`); "mica" is a LoRA variant.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_OFF = (None, False, {}, [], "")
# field -> the values that are plain LoRA (every other value is refused by name).
_PLAIN: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "use_rslora": (True, False),
    "task_type": (None, "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"),
    "init_lora_weights": _PLAIN_INITS,
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "use_dora": (False,),
    "use_qalora": (False,),
    "lora_bias": (False,),
    "modules_to_save": _OFF,
    "rank_pattern": _OFF,
    "alpha_pattern": _OFF,
    "layer_replication": _OFF,
    "megatron_config": _OFF,
    "trainable_token_indices": _OFF,
    "target_parameters": _OFF,
    "alora_invocation_tokens": _OFF,
    "use_bdlora": _OFF,
    "arrow_config": _OFF,
    "kasa_config": _OFF,
    "velora_config": _OFF,
    "monteclora_config": _OFF,
    "enable_lora": _OFF,  # PEFT <= 0.2 (GPT-2's merged c_attn)
}
# Fields that never change the served function: read elsewhere (r, lora_alpha, use_rslora, the targets,
# through the keys), bookkeeping, training-only (dropout, runtime, weight tying of modules_to_save), or the
# settings of an init method that init_lora_weights does not select (or that leaves the base unmodified).
_NEUTRAL = frozenset(
    {
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "lora_dropout",
        "runtime_config",
        "ensure_weight_tying",
        "megatron_core",
        "qalora_group_size",
        "eva_config",
        "corda_config",
        "loftq_config",
        "lora_ga_config",
        "merge_weights",  # PEFT <= 0.2: merge at eval, same function
    }
)


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
            "rslora": cfg.get("use_rslora", False),
            "leave_out": tuple(i for i in range(total) if i not in kinds_by_layer),
        }
    )
    assert isinstance(spec, LoraSpec)
    return spec, tensors


def _check_options(cfg: dict[str, Any]) -> None:
    """InvalidSpec naming the first field whose value is not plain LoRA, or that kronserve does not know."""
    if cfg.get("peft_type") != "LORA":
        raise InvalidSpec(f"PEFT peft_type={cfg.get('peft_type')!r} is not supported (LORA only)")
    for option, value in cfg.items():
        if option in _NEUTRAL:
            continue
        allowed = _PLAIN.get(option)
        if allowed is None:
            if _is_off(value):
                continue
            raise InvalidSpec(
                f"PEFT option {option}={value!r} is unknown to kronserve, so it may change what the adapter "
                "computes: refused (plain LoRA only)"
            )
        if not any(_same(value, a) for a in allowed):
            raise InvalidSpec(f"PEFT option {option}={value!r} is not plain LoRA: {_why(option, allowed)}")


def _same(value: Any, allowed: Any) -> bool:
    """Equal and of the same kind (JSON `1` is not `true`, `0` is not `false`)."""
    return type(value) is type(allowed) and value == allowed


def _is_off(value: Any) -> bool:
    return any(_same(value, off) for off in _OFF)


def _why(option: str, allowed: tuple[Any, ...]) -> str:
    if option == "init_lora_weights":
        return (
            f"kronserve serves init_lora_weights in {list(allowed)}; PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ factors are "
            "relative to a modified base model (save with path_initial_model_for_weight_conversion to convert "
            "them to plain LoRA)"
        )
    if allowed is _OFF:
        return "kronserve needs it unset"
    return f"kronserve needs {' or '.join(repr(a) for a in allowed)}"


# ---- prefix tuning ------------------------------------------------------------------------------------------
# PEFT's PrefixTuningConfig fields that never change the served prefix (the saved `prompt_embeddings` is the final
# prefix, with or without `prefix_projection`), and those read below.
_PREFIX_NEUTRAL = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
     "peft_version", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
     "num_layers", "encoder_hidden_size", "prefix_projection", "modules_to_save"}
)  # fmt: skip


def is_prefix_tuning(cfg: dict[str, Any]) -> bool:
    return cfg.get("peft_type") == "PREFIX_TUNING"


def import_prefix(cfg: dict[str, Any], state: dict[str, torch.Tensor], geometry: Geometry) -> tuple[Any, dict]:
    """The native `prefix` spec (PEFT's positions, decoder self-attention only) and final prefixes.

    PEFT's `get_prompt` views `prompt_embeddings` [P, L·2·token_dim] as [P, 2L, H, d], doubles it along the layer
    axis for an encoder-decoder model (num_transformer_submodules 2), and splits it in fours: decoder layer i takes
    rows 4i and 4i+1 (mod 2L) as its self-attention keys and values; the cross-attention half is dropped (PEFT
    resets that cache), and the encoder gets nothing.
    """
    _check_prefix_options(cfg)
    embeddings = [t for k, t in state.items() if k == "prompt_embeddings" or k.endswith(".prompt_embeddings")]
    if len(embeddings) != 1 or len(state) != 1:
        raise InvalidAdapter(f"a PEFT prefix-tuning file holds one tensor, prompt_embeddings; this has {sorted(state)}")
    prompt = embeddings[0].float()
    length, layers, width = int(cfg.get("num_virtual_tokens", 0)), geometry.num_decoder_layers, geometry.d_attn
    if prompt.shape != (length, layers * 2 * width):
        raise InvalidAdapter(
            f"prompt_embeddings has shape {tuple(prompt.shape)}; {length} virtual tokens on {layers} layers of "
            f"attention width {width} need {(length, layers * 2 * width)}"
        )
    rows = prompt.view(length, 2 * layers, width)
    tensors = {}
    for i in range(layers):
        tensors[f"prefix.decoder.{i}.mh.k"] = rows[:, (4 * i) % (2 * layers)].clone()
        tensors[f"prefix.decoder.{i}.mh.v"] = rows[:, (4 * i + 1) % (2 * layers)].clone()
    spec = parse_spec({"method": "prefix", "prefix_length": length, "locations": ("decoder",), "positions": "peft"})
    return spec, tensors


def _check_prefix_options(cfg: dict[str, Any]) -> None:
    """InvalidSpec naming the first field kronserve cannot honour."""
    for option, value in cfg.items():
        if option not in _PREFIX_NEUTRAL and not _is_off(value):
            raise InvalidSpec(f"PEFT prefix-tuning option {option}={value!r} is unknown to kronserve: refused")
    if cfg.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        raise InvalidSpec(f"PEFT option task_type={cfg.get('task_type')!r}: kronserve serves SEQ_2_SEQ_LM prefixes")
    if cfg.get("num_transformer_submodules", 2) != 2:
        raise InvalidSpec(
            f"PEFT option num_transformer_submodules={cfg.get('num_transformer_submodules')!r}: an encoder-decoder "
            "prefix has 2 (kronserve maps PEFT's layers as its seq2seq get_prompt does)"
        )
    if cfg.get("modules_to_save"):
        raise InvalidSpec(f"PEFT option modules_to_save={cfg['modules_to_save']!r} is not supported")
