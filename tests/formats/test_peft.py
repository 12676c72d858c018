"""PEFT configs are read as an allow-list: only what is exactly plain LoRA is served, anything else is refused
by the name of its field.

The starting point is a real save (`tests/fixtures/golden/lora/`, written by PEFT 0.21.2, every field of its
`LoraConfig`); its numbers against PEFT's own forward are checked in `test_golden.py`. Here each case changes
one field of that config, as a PiSSA, aLoRA, BD-LoRA, ... save would carry it (field names and values from
peft 0.21.2 `tuners/lora/config.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kronserve.errors import InvalidSpec
from kronserve.formats.peft import import_lora
from kronserve.methods import Geometry

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
GEOMETRY = Geometry(d_model=128, num_layers=2, num_decoder_layers=2, d_ff=128, d_attn=64)  # golden backbone


@pytest.fixture(scope="module")
def saved() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = json.loads((GOLDEN / "lora" / "adapter_config.json").read_text())
    return cfg, load_file(GOLDEN / "lora" / "adapter_model.safetensors")


def test_the_real_plain_save_is_accepted_with_its_numbers(saved) -> None:
    cfg, state = saved
    spec, tensors = import_lora(cfg, state, GEOMETRY)
    assert (spec.rank, spec.alpha, spec.targets, spec.rslora) == (8, 8.0, ("q", "v"), False)
    assert len(tensors) == len(state)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_initialisations_are_accepted(saved, init) -> None:
    cfg, state = saved
    import_lora({**cfg, "init_lora_weights": init}, state, GEOMETRY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "lora_ga"),
        ("init_lora_weights", "mica"),
        ("init_lora_weights", 1),
        ("alora_invocation_tokens", [32, 7]),
        ("use_bdlora", {"target_modules_bd_a": ["q"], "nblocks": 2}),
        ("kasa_config", {"beta": 0.1}),
        ("arrow_config", {"top_k": 3}),
        ("velora_config", {"num_groups": 32}),
        ("monteclora_config", {"num_samples": 4}),
        ("use_dora", True),
        ("use_qalora", True),
        ("lora_bias", True),
        ("fan_in_fan_out", True),
        ("bias", "lora_only"),
        ("bias", "all"),
        ("rank_pattern", {"q": 16}),
        ("alpha_pattern", {"q": 16}),
        ("modules_to_save", ["lm_head"]),
        ("trainable_token_indices", [5, 6]),
        ("target_parameters", ["wi.weight"]),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("use_rslora", "yes"),
        ("task_type", "SEQ_CLS"),
        ("some_future_variant", {"k": 1}),
        ("use_some_future_trick", True),
    ],
)
def test_anything_but_plain_lora_is_refused_by_its_field(saved, field, value) -> None:
    cfg, state = saved
    with pytest.raises(InvalidSpec, match=f"PEFT option {field}="):
        import_lora({**cfg, field: value}, state, GEOMETRY)


@pytest.mark.parametrize("value", [None, False, {}, []])
def test_an_unknown_field_that_is_off_is_accepted(saved, value) -> None:
    """How PEFT disables every variant and extra; a newer PEFT's save of a plain adapter writes its new fields so."""
    cfg, state = saved
    import_lora({**cfg, "some_future_config": value}, state, GEOMETRY)


def test_a_converted_pissa_save_is_plain_lora(saved) -> None:
    """`save_pretrained(path_initial_model_for_weight_conversion=...)` rewrites init to true, r and alpha doubled
    (peft `peft_model.py`); the CorDA/PiSSA settings it keeps are only read at init."""
    cfg, state = saved
    converted = {**cfg, "init_lora_weights": True, "corda_config": {"corda_method": "kpm"}, "lora_alpha": 11.3137}
    spec, _ = import_lora(converted, state, GEOMETRY)
    assert spec.alpha == pytest.approx(11.3137)


def test_another_peft_method_is_refused_by_its_type(saved) -> None:
    cfg, state = saved
    with pytest.raises(InvalidSpec, match="peft_type='IA3'"):
        import_lora({**cfg, "peft_type": "IA3", "feedforward_modules": ["wo"]}, state, GEOMETRY)
