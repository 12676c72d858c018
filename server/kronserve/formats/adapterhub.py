"""AdapterHub `adapters` (1.x) saved directories -> native spec + tensors.

A saved adapter is `adapter_config.json` (`{"config": {...}, "name", "model_type", "version", ...}`) plus
`pytorch_adapter.bin` (pickle) or `adapter.safetensors`. On T5 the keys are
`[transformer.]{encoder|decoder}.block.{i}.layer.{j}.adapters.<name>.{adapter_down.0|adapter_up}.<leaf>`
(encoder j: 0 = mh, 1 = ffn; decoder j: 0 = mh, 1 = cross, 2 = ffn) and the shared Compacter rule
`[transformer.]shared_parameters.<name>.phm_rule`. Options kronserve cannot honour are refused by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from ..errors import InvalidAdapter, InvalidSpec
from ..methods import AdapterSpec, parse_spec

_SITE_KEY = re.compile(
    r"^(?:transformer\.|model\.)?(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<layer>\d+)"
    r"\.adapters\.(?P<name>[^.]+)\.(?P<proj>adapter_down\.0|adapter_up)\.(?P<leaf>[A-Za-z_]+)$"
)
_SHARED_KEY = re.compile(r"^(?:transformer\.|model\.)?shared_parameters\.(?P<name>[^.]+)\.(?P<leaf>[A-Za-z_]+)$")
_KIND = {"encoder": {0: "mh", 1: "ffn"}, "decoder": {0: "mh", 1: "cross", 2: "ffn"}}
_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu_new": "gelu_new", "gelu": "gelu"}
# Options that change the computation in ways kronserve does not implement, with the value it needs.
_MUST_BE = {
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "shared_W_phm": False,
}
_MUST_BE_EMPTY = ("inv_adapter",)


def is_adapterhub_config(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg.get("config"), dict) and "model_type" in cfg and "peft_type" not in cfg


def parse_config(raw: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidAdapter(f"adapter_config.json is not JSON: {type(e).__name__}") from e
    if not isinstance(cfg, dict):
        raise InvalidAdapter("adapter_config.json must be a JSON object")
    return cfg


def spec_from_config(cfg: dict[str, Any]) -> AdapterSpec:
    """The native spec equivalent to an AdapterHub bottleneck/Compacter config, or InvalidSpec naming the option."""
    c = cfg["config"]
    if cfg.get("model_type") not in (None, "t5"):
        raise InvalidSpec(f"adapter was saved for model_type {cfg.get('model_type')!r}; kronserve serves T5")
    if c.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise InvalidSpec(
            f"AdapterHub architecture {c.get('architecture')!r} is not supported "
            "(bottleneck, prefix_tuning, or a union of a prefix and a bottleneck: MAM)"
        )
    for option, needed in _MUST_BE.items():
        if option in c and bool(c[option]) != needed:
            raise InvalidSpec(f"AdapterHub option {option}={c[option]!r} is not supported (kronserve needs {needed})")
    for option in _MUST_BE_EMPTY:
        if c.get(option):
            raise InvalidSpec(f"AdapterHub option {option}={c[option]!r} is not supported")
    fields: dict[str, Any] = {
        "placement": _placement(c),
        "sites": _sites(c),
        "reduction_factor": _reduction_factor(c.get("reduction_factor", 16)),
        "activation": _activation(c.get("non_linearity", "relu"), has_version="version" in cfg),
        "scaling": _scaling(c.get("scaling", 1.0)),
        "leave_out": tuple(int(i) for i in c.get("leave_out") or ()),
    }
    if c.get("phm_layer"):
        method = "compacter++" if fields["sites"] == ("ffn",) else "compacter"
        if not c.get("shared_phm_rule", True):
            method = "phm"
        fields |= {
            "phm_dim": int(c.get("phm_dim", 4)),
            "rank": int(c.get("phm_rank", 1)) if c.get("factorized_phm_W", True) else None,
            "shared_rule": bool(c.get("shared_phm_rule", True)),
            "factorized_rule": bool(c.get("factorized_phm_rule", False)),
        }
    else:
        method = "pfeiffer" if fields["placement"] == "pfeiffer" else "houlsby"
    return parse_spec({"method": method, **fields})


def tensors_from_state(
    spec: AdapterSpec, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename AdapterHub keys to native ones (head weights and other adapters' keys are ignored)."""
    name = _adapter_name(cfg, state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _SITE_KEY.match(key):
            if m["name"] != name:
                continue
            kind = _KIND[m["stack"]].get(int(m["layer"]))
            if kind is None:
                raise InvalidAdapter(f"{key}: layer index {m['layer']} is not an adapter site of T5")
            proj = "down" if m["proj"].startswith("adapter_down") else "up"
            out[f"{m['stack']}.{m['block']}.{kind}.{proj}.{m['leaf']}"] = tensor
        elif (m := _SHARED_KEY.match(key)) and m["name"] == name:
            out[m["leaf"]] = tensor
    if spec.family == "phm":
        _check_shared_rule(spec, out)
        if not cfg["config"].get("phm_bias", True):
            _add_zero_biases(out)
    return out


def _adapter_name(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    names = {m["name"] for k in state if (m := _SITE_KEY.match(k))}
    if cfg.get("name") in names:
        return str(cfg["name"])
    if len(names) == 1:
        return names.pop()
    raise InvalidAdapter(f"cannot tell which adapter to import: weights hold {sorted(names) or 'none'}")


def _check_shared_rule(spec: AdapterSpec, out: dict[str, torch.Tensor]) -> None:
    if not getattr(spec, "shared_rule", False):
        return
    needed = ("phm_rule_left", "phm_rule_right") if getattr(spec, "factorized_rule", False) else ("phm_rule",)
    missing = [n for n in needed if n not in out]
    if missing:
        raise InvalidAdapter(
            f"this Compacter's shared phm rule is missing ({', '.join(missing)}): AdapterHub's save from a plain "
            "T5ForConditionalGeneration drops `shared_parameters.<name>.phm_rule`. Without it the adapter cannot "
            "be served; re-save it with the rule (e.g. include shared_parameters in the weights file)"
        )


def _add_zero_biases(out: dict[str, torch.Tensor]) -> None:
    for key in [k for k in out if k.endswith(("down.W_right", "up.W_right", "down.W", "up.W"))]:
        prefix = key.rsplit(".", 1)[0]
        w = out[key]
        out.setdefault(f"{prefix}.b", torch.zeros(w.shape[0] * w.shape[-1]))


def _placement(c: dict[str, Any]) -> str:
    """The native placement computing what AdapterHub computes on T5, or InvalidSpec naming the option.

    On T5 the adapter layer gets `layer_norm=None` (adapters `models/t5/modeling_t5.py`), so with x the
    sublayer's input and f its output, `Adapter.pre_forward`/`forward`/`post_forward` (`methods/modeling.py`)
    give `h = x + f if original_ln_before else f`, `r = f if residual_before_ln is True else h`,
    `out = A(h) + r + (x if original_ln_after else 0)`; `ParallelAdapter` gives `A(x) + f + (x if …)`.
    """
    after = bool(c.get("original_ln_after", True))
    if c.get("is_parallel"):
        if not after:
            raise InvalidSpec(_NO_RESIDUAL.format(form="f + A(x)"))
        return "parallel"  # ParallelAdapter ignores original_ln_before and residual_before_ln
    residual = c.get("residual_before_ln", True)
    if residual is not True and residual is not False:
        raise InvalidSpec(
            f"AdapterHub option residual_before_ln={residual!r} is not supported: AdapterHub's own forward fails "
            "with it on T5 (it only sets that residual when the layer passes a layer norm, which T5's never do)"
        )
    if not c.get("original_ln_before", False):
        if not after:
            raise InvalidSpec(_NO_RESIDUAL.format(form="f + A(f)"))
        return "houlsby"  # the residual is f whatever residual_before_ln says
    if residual and after:
        return "pfeiffer"  # f + A(x + f) + x
    if not residual and not after:
        return "pfeiffer"  # (x + f) + A(x + f): AdapterPlus' choice
    if not residual:
        raise InvalidSpec(
            "AdapterHub option residual_before_ln=False with original_ln_before=True and original_ln_after=True is "
            "not supported: on T5 AdapterHub then adds the sublayer's input twice (out = 2x + f + A(x + f)), a "
            "placement kronserve does not serve"
        )
    raise InvalidSpec(_NO_RESIDUAL.format(form="f + A(x + f)"))


_NO_RESIDUAL = (
    "AdapterHub option original_ln_after=False is not supported with these options: AdapterHub then drops the "
    "sublayer's residual x on T5 (out = {form}), a placement kronserve does not serve"
)


def _sites(c: dict[str, Any]) -> tuple[str, ...]:
    sites = [
        s for s, opt in (("mh", "mh_adapter"), ("cross", "cross_adapter"), ("ffn", "output_adapter")) if c.get(opt)
    ]
    if not sites:
        raise InvalidSpec("AdapterHub config places the adapter nowhere (mh_adapter and output_adapter are false)")
    return tuple(sites)


def _reduction_factor(value: Any) -> int:
    if isinstance(value, dict):
        values = set(value.values())
        if len(values) != 1:
            raise InvalidSpec(f"AdapterHub option reduction_factor={value!r}: per-layer factors are not supported")
        value = values.pop()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise InvalidSpec(f"AdapterHub option reduction_factor={value!r} is not a positive integer")
    return int(value)


def _activation(value: Any, has_version: bool) -> str:
    name = str(value).lower()
    if name == "gelu" and not has_version:
        name = "gelu_new"  # AdapterHub rewrites gelu to gelu_new for configs saved without a version key
    if name not in _ACTIVATIONS:
        raise InvalidSpec(f"AdapterHub option non_linearity={value!r} is not supported ({sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _scaling(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSpec(f"AdapterHub option scaling={value!r} is not supported (a fixed number only)")
    return float(value)
