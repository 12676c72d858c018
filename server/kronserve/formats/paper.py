"""The Compacter paper's own checkpoints (`rabeehk/compacter`): a whole-model `pytorch_model.bin`.

One task's adapters are at `{encoder|decoder}.block.{i}.layer.{j}.adapter_controller.adapters.<task>.
{down_sampler|up_sampler}.{W_left,W_right|W,b[,phm_rule...]}`; the rule may also sit outside the adapter
modules; the trained T5 layer norms are the checkpoint's own `...layer_norm.weight` and
`{encoder|decoder}.final_layer_norm.weight`. The file carries no config, so the spec is read from the
shapes (n, rank, bottleneck, sites); the paper's code applies the adapter as `x + f + A(f)` with gelu_new.
It does carry the frozen backbone it was trained on: `check_backbone` compares it with the serving one.
"""

from __future__ import annotations

import re

import torch

from ..errors import BackboneMismatch, InvalidAdapter
from ..methods import Geometry, MethodSpec, parse_spec

_ADAPTER = re.compile(
    r"^(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<layer>\d+)\.adapter_controller\.adapters\."
    r"(?P<name>[^.]+)\.(?P<proj>down_sampler|up_sampler)\.(?P<leaf>[A-Za-z_]+)$"
)
_NORM = re.compile(
    r"^(?P<stack>encoder|decoder)\.(?:block\.(?P<block>\d+)\.layer\.(?P<layer>\d+)\.layer_norm|final_layer_norm)\.weight$"
)
_SITE = {"encoder": {0: "mh", 1: "ffn"}, "decoder": {0: "mh", 1: "cross", 2: "ffn"}}
_RULES = ("phm_rule", "phm_rule_left", "phm_rule_right")


def is_paper_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    return any(_ADAPTER.match(k) for k in state)


def import_paper(
    state: dict[str, torch.Tensor], geometry: Geometry, name: str | None = None, activation: str = "gelu_new"
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The native spec and tensors of one task of a paper checkpoint (its adapters, rule and layer norms)."""
    name = _task_name(state, name)
    tensors: dict[str, torch.Tensor] = {}
    rules: dict[str, list[torch.Tensor]] = {}
    for key, t in state.items():
        m = _ADAPTER.match(key)
        if m is None or m["name"] != name:
            continue
        site = _SITE[m["stack"]].get(int(m["layer"]))
        if site is None:
            raise InvalidAdapter(f"{key}: layer index {m['layer']} is not an adapter site of T5")
        proj = "down" if m["proj"] == "down_sampler" else "up"
        if m["leaf"] in _RULES:
            rules.setdefault(m["leaf"], []).append(t)
        tensors[f"{m['stack']}.{m['block']}.{site}.{proj}.{m['leaf']}"] = t
    rules |= {leaf: [t] for leaf, t in state.items() if leaf in _RULES}  # a rule kept outside the adapters
    shared = bool(rules) and all(all(torch.equal(v[0], x) for x in v) for v in rules.values())
    if shared:
        tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[1] not in _RULES}
        tensors |= {leaf: v[0] for leaf, v in rules.items()}
    tensors |= _layer_norms(state)
    return _spec(tensors, geometry, shared, activation), tensors


def check_backbone(state: dict[str, torch.Tensor], served: dict[str, torch.Tensor]) -> int:
    """BackboneMismatch naming the first frozen backbone tensor of the checkpoint that is not the served one.

    Adapters and the per-task layer norms are the task's own; every other tensor the served backbone also has
    must hold the same values, up to the rounding of the coarser of the two dtypes (a float16 server of the
    same float32 weights agrees; another backbone differs everywhere). Returns how many tensors were compared.
    """
    compared = 0
    for key, theirs in state.items():
        ours = served.get(key)
        if ours is None or _ADAPTER.match(key) or _NORM.match(key) or not theirs.is_floating_point():
            continue
        if theirs.shape != ours.shape or not _same_values(theirs, ours):
            raise BackboneMismatch(
                f"the checkpoint was trained on another backbone: its {key} differs from the serving backbone's"
            )
        compared += 1
    return compared


def _same_values(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    eps = max(torch.finfo(theirs.dtype).eps, torch.finfo(ours.dtype).eps)
    return torch.allclose(theirs.float().to(ours.device), ours.float(), rtol=eps, atol=1e-6)


def _task_name(state: dict[str, torch.Tensor], name: str | None) -> str:
    names = sorted({m["name"] for k in state if (m := _ADAPTER.match(k))})
    if name in names:
        return name
    if name is None and len(names) == 1:
        return names[0]
    raise InvalidAdapter(f"checkpoint holds adapters for tasks {names}; name one of them (got {name!r})")


def _layer_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if m := _NORM.match(key):
            if m["block"] is None:
                out[f"layer_norm.{m['stack']}.final"] = t
            else:
                out[f"layer_norm.{m['stack']}.{m['block']}.{_SITE[m['stack']][int(m['layer'])]}"] = t
    return out


def _spec(tensors: dict[str, torch.Tensor], geometry: Geometry, shared: bool, activation: str) -> MethodSpec:
    down_b = next((v for k, v in tensors.items() if k.endswith(".down.b")), None)
    left = next((v for k, v in tensors.items() if k.endswith(".down.W_left")), None)
    dense = next((v for k, v in tensors.items() if k.endswith(".down.W")), None)
    if down_b is None or (left is None and dense is None):
        raise InvalidAdapter("no PHM adapter weights (down_sampler W_left/W and b) found for the task")
    n = (left if left is not None else dense).shape[0]
    kinds = {k.split(".")[2] for k in tensors if k.startswith(("encoder.", "decoder."))}
    sites = tuple(s for s in ("mh", "cross", "ffn") if s in kinds)
    method = "compacter++" if sites == ("ffn",) and shared else ("compacter" if shared else "phm")
    return parse_spec(
        {
            "method": method,
            "placement": "houlsby",
            "sites": sites,
            "reduction_factor": geometry.d_model // down_b.shape[0],
            "activation": activation,
            "phm_dim": n,
            "rank": None if left is None else left.shape[2],
            "shared_rule": shared,
            "factorized_rule": any(k.endswith("phm_rule_left") for k in tensors),
            "layer_norms": any(k.startswith("layer_norm.") for k in tensors),
        }
    )
