"""Prefix-tuning imports: each library's layer mapping, written here as the library's own view/permute/split, and the
options kronserve cannot honour refused by name. The libraries' numbers are checked by test_golden.py."""

from __future__ import annotations

import pytest
import torch

from kronserve.errors import InvalidAdapter, InvalidSpec
from kronserve.formats import adapterhub_prefix, peft
from kronserve.methods import Geometry

G = Geometry(d_model=16, num_layers=2, num_decoder_layers=2, d_ff=32, d_attn=8)
HEADS, D_KV, P = 2, 4, 3


def adapterhub_config(**options) -> dict:
    config = {"architecture": "prefix_tuning", "encoder_prefix": True, "cross_prefix": True, "leave_out": [],
              "flat": False, "prefix_length": P, "bottleneck_size": 5, "non_linearity": "tanh", "dropout": 0.0,
              "use_gating": False, "shared_gating": True, "init_weights_seed": None}  # fmt: skip
    return {"config": {**config, **options}, "name": "t", "model_type": "t5", "version": "1.3.0"}


def mlp_state(layers: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for location, n in layers.items():
        p = f"prefix_tuning.prefix_tunings.t.{location}."
        state |= {
            p + "wte.weight": torch.randn(P, G.d_model, generator=gen),
            p + "control_trans.0.weight": torch.randn(5, G.d_model, generator=gen),
            p + "control_trans.0.bias": torch.randn(5, generator=gen),
            p + "control_trans.2.weight": torch.randn(n * 2 * G.d_attn, 5, generator=gen),
            p + "control_trans.2.bias": torch.randn(n * 2 * G.d_attn, generator=gen),
        }
    return state


def adapterhub_layers(state: dict[str, torch.Tensor], location: str, n: int) -> list[tuple[torch.Tensor, ...]]:
    """AdapterHub's PrefixTuning.forward for batch 1: (keys, values) [H, P, d_kv] of the location's n layers."""
    p = {k.rsplit(f"{location}.", 1)[1]: v for k, v in state.items() if f".{location}." in k}
    h = torch.tanh(p["wte.weight"] @ p["control_trans.0.weight"].T + p["control_trans.0.bias"])
    kv = (h @ p["control_trans.2.weight"].T + p["control_trans.2.bias"]).view(1, P, n * 2, HEADS, D_KV)
    return [(pair[0][0], pair[1][0]) for pair in kv.permute(2, 0, 3, 1, 4).split(2)]


def native_heads(t: torch.Tensor) -> torch.Tensor:
    """A native prefix [P, H·d_kv] as T5 splits it: [H, P, d_kv]."""
    return t.view(P, HEADS, D_KV).transpose(0, 1)


def test_adapterhub_mlp_prefixes_land_on_the_layers_the_library_gives_them() -> None:
    gen = torch.Generator().manual_seed(0)
    # leave_out 0 and 3: the encoder keeps layer 1, the decoder's self- and cross-attention layer 0 (global 2).
    state = mlp_state({"encoder_prefix": 1, "self_prefix": 1, "cross_prefix": 1}, gen)
    spec, tensors = adapterhub_prefix.import_prefix(adapterhub_config(leave_out=[0, 3]), state, G)
    assert spec.method == "prefix" and spec.positions == "adapterhub" and spec.leave_out == (0, 3)
    assert sorted(tensors) == sorted(
        f"prefix.{s}.{kv}" for s in ("encoder.1.mh", "decoder.0.mh", "decoder.0.cross") for kv in "kv"
    )
    for location, site in (("encoder_prefix", "encoder.1.mh"), ("cross_prefix", "decoder.0.cross")):
        ((k, v),) = adapterhub_layers(state, location, 1)
        assert torch.allclose(native_heads(tensors[f"prefix.{site}.k"]), k, atol=1e-5)
        assert torch.allclose(native_heads(tensors[f"prefix.{site}.v"]), v, atol=1e-5)


def test_adapterhub_flat_prefix_is_taken_as_it_is_and_self_only_has_no_encoder_or_cross_prefix() -> None:
    flat = torch.randn(P * 2 * 2 * G.d_attn, generator=torch.Generator().manual_seed(1))
    state = {"prefix_tuning.prefix_tunings.t.self_prefix.control_trans": flat}
    cfg = adapterhub_config(flat=True, encoder_prefix=False, cross_prefix=False)
    spec, tensors = adapterhub_prefix.import_prefix(cfg, state, G)
    assert spec.locations == ("decoder",)
    layers = [(pair[0][0], pair[1][0]) for pair in flat.view(1, P, 4, HEADS, D_KV).permute(2, 0, 3, 1, 4).split(2)]
    for i, (k, v) in enumerate(layers):
        assert torch.equal(native_heads(tensors[f"prefix.decoder.{i}.mh.k"]), k)
        assert torch.equal(native_heads(tensors[f"prefix.decoder.{i}.mh.v"]), v)


def test_peft_decoder_layer_i_takes_rows_4i_and_4i_plus_1_mod_2l() -> None:
    """PEFT's seq2seq get_prompt: view [P, 2L, H, d], double along the layer axis, permute, split in fours."""
    layers = 4
    g = Geometry(16, layers, layers, 32, 8)
    prompt = torch.randn(P, layers * 2 * g.d_attn, generator=torch.Generator().manual_seed(2))
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": P, "token_dim": 8,
           "num_transformer_submodules": 2, "num_attention_heads": HEADS, "num_layers": layers}  # fmt: skip
    spec, tensors = peft.import_prefix(cfg, {"prompt_embeddings": prompt}, g)
    assert (spec.locations, spec.positions, spec.prefix_length) == (("decoder",), "peft", P)
    view = prompt.view(1, P, layers * 2, HEADS, D_KV)
    past = torch.cat([view, view], dim=2).permute([2, 0, 3, 1, 4]).split(4)
    for i, chunk in enumerate(past):
        assert torch.equal(native_heads(tensors[f"prefix.decoder.{i}.mh.k"]), chunk[0][0])
        assert torch.equal(native_heads(tensors[f"prefix.decoder.{i}.mh.v"]), chunk[1][0])
    assert torch.equal(tensors["prefix.decoder.0.mh.k"], tensors["prefix.decoder.2.mh.k"])  # i and i + L/2 share


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"use_gating": True}, "use_gating"), ({"some_future_flag": 3}, "some_future_flag")],
)
def test_adapterhub_prefix_options_kronserve_cannot_honour_are_refused_by_name(options: dict, needle: str) -> None:
    state = mlp_state({"encoder_prefix": 2, "self_prefix": 2, "cross_prefix": 2}, torch.Generator().manual_seed(0))
    with pytest.raises(InvalidSpec, match=needle):
        adapterhub_prefix.import_prefix(adapterhub_config(**options), state, G)


def test_an_adapterhub_union_other_than_prefix_and_bottleneck_is_refused() -> None:
    cfg = adapterhub_config()
    cfg["config"] = {"architecture": "union", "configs": [cfg["config"], {"architecture": "lora", "r": 8}]}
    with pytest.raises(InvalidSpec, match="union"):
        adapterhub_prefix.import_prefix(cfg, {}, G)


@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({"num_transformer_submodules": 1}, InvalidSpec, "num_transformer_submodules"),
        ({"task_type": "CAUSAL_LM"}, InvalidSpec, "task_type"),
        ({"token_dim": 16}, InvalidAdapter, "prompt_embeddings has shape"),
        ({"new_peft_option": "on"}, InvalidSpec, "new_peft_option"),
    ],
)
def test_peft_prefix_options_kronserve_cannot_honour_are_refused_by_name(options, error, needle) -> None:
    width = options.get("token_dim", 8)
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": P, "token_dim": 8,
           "num_transformer_submodules": 2, "num_layers": 2, **options}  # fmt: skip
    with pytest.raises(error, match=needle):
        peft.import_prefix(cfg, {"prompt_embeddings": torch.zeros(P, 2 * 2 * width)}, G)
