"""The engine end to end: mixed batches equal each request alone; zero adapters equal the bare backbone."""

from __future__ import annotations

import random

import pytest
import torch

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.errors import InvalidRequest, UnknownTask

METHODS = [
    ("compacter", {}),
    ("compacter++", {}),
    ("phm", {"reduction_factor": 16}),
    ("houlsby", {}),
    ("pfeiffer", {}),
    ("compacter", {"layer_norms": True, "activation": "relu"}),
    ("houlsby", {"placement": "parallel", "scaling": 0.5}),
    ("compacter++", {"placement": "pfeiffer", "factorized_rule": True}),
    ("pfeiffer", {"layer_norms": True, "activation": "gelu"}),
    ("lora", {}),
    ("lora", {"targets": ("q", "k", "v", "o", "wi", "wo"), "rank": 4, "alpha": 16.0, "rslora": True}),
    ("prefix", {"prefix_length": 3}),
    ("prefix", {"prefix_length": 5, "locations": ("decoder",), "positions": "peft"}),
    ("prefix", {"prefix_length": 7, "leave_out": (0, 3)}),
    ("mam", {"prefix_length": 4, "reduction_factor": 8}),
]


def std_of(method: str) -> float:
    """Weight scale of the random test adapters. A random prefix needs large keys and values to move the random
    tiny T5's greedy output at all (bare, it emits token 0 at every step), so prefix rows are tested on real
    differences, not on zeros that every task shares."""
    return 8.0 if method == "prefix" else 0.3


INPUTS = ["summarize: the cat sat on the mat", "hi", "translate English to German: good morning", "x" * 40]


@pytest.fixture
def mixed(engine: Engine, adapter_for) -> tuple[list[str | None], list[str]]:
    tasks: list[str | None] = []
    for i, (method, overrides) in enumerate(METHODS):
        engine.load(adapter_for(f"task{i}", method, seed=i, std=std_of(method), **overrides))
        tasks.append(f"task{i}")
    rows = [(t, INPUTS[j % len(INPUTS)]) for j, t in enumerate(tasks + tasks[:3] + [None, None, None])]
    random.Random(0).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_batch_generates_what_each_request_generates_alone(engine: Engine, mixed, num_beams: int) -> None:
    tasks, inputs = mixed
    batch = engine.generate(tasks, inputs, max_new_tokens=10, min_new_tokens=10, num_beams=num_beams)
    alone = [
        engine.generate([t], [x], max_new_tokens=10, min_new_tokens=10, num_beams=num_beams).token_ids[0]
        for t, x in zip(tasks, inputs, strict=True)
    ]
    assert batch.token_ids == alone
    # The adapters matter: the same input under different tasks does not all come out the same.
    same_input = [ids for t, x, ids in zip(tasks, inputs, alone, strict=True) if x == inputs[0]]
    assert len({tuple(ids) for ids in same_input}) > 1


def test_mixed_batch_scores_equal_each_request_alone(engine: Engine, mixed) -> None:
    tasks, inputs = mixed
    targets = [f"answer {i}" for i in range(len(tasks))]
    batch = engine.score(tasks, inputs, targets).scores
    alone = [engine.score([t], [x], [y]).scores[0] for t, x, y in zip(tasks, inputs, targets, strict=True)]
    assert batch == pytest.approx(alone, abs=1e-4)
    assert len({round(s, 3) for s in alone}) > len(tasks) // 2  # tasks really score differently


def test_score_is_sum_of_target_token_log_probs_including_eos(engine: Engine, adapter_for) -> None:
    engine.load(adapter_for("t", "compacter", std=0.3))
    model, tok = engine.backbone.model, engine.backbone.tokenizer
    got = engine.score(["t", None], ["question", "question"], ["ab", "ab"]).scores
    # Independent check on the bare row: teacher-forced HF forward with labels, then sum of log-probs.
    enc = tok(["question"], return_tensors="pt")
    labels = tok(["ab"], return_tensors="pt").input_ids
    assert labels[0, -1].item() == tok.eos_token_id
    with torch.no_grad():
        logits = model(**enc, labels=labels).logits
    expect = torch.log_softmax(logits, -1)[0].gather(-1, labels[0, :, None]).sum().item()
    assert got[1] == pytest.approx(expect, abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-3)


def test_zero_up_projection_leaves_the_backbone_bit_identical(engine: Engine, adapter_for, tiny_dir) -> None:
    for i, method in enumerate(["compacter", "phm", "houlsby", "pfeiffer"]):
        a = adapter_for(f"zero{i}", method, seed=i, std=0.5)
        for name, t in a.tensors.items():
            if ".up." in name and ("W_right" in name or name.endswith((".b", ".W", "weight", "bias"))):
                t.zero_()
        engine.load(a)
    bare = load_backbone(str(tiny_dir), device="cpu")  # no sites installed at all
    tok = bare.tokenizer
    tasks = ["zero0", "zero1", None, "zero2", "zero3"]
    inputs = [*INPUTS, "another input"]
    enc = tok(inputs[:5], return_tensors="pt", padding=True)
    dec = torch.zeros(5, 1, dtype=torch.long)
    with torch.no_grad():
        expect = bare.model(**enc, decoder_input_ids=dec).logits
    with engine.resident(tasks) as (_, slots), engine._routed_slots(slots):
        got = engine.backbone.model(**enc, decoder_input_ids=dec).logits
    assert torch.equal(got, expect)
    gen = engine.generate(tasks, inputs[:5], max_new_tokens=8, min_new_tokens=8).token_ids
    with torch.no_grad():
        out = bare.model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert gen == [row[1:].tolist() for row in out]  # 8 tokens each: min_new_tokens keeps EOS out


def test_unknown_task_raises_before_any_forward(engine: Engine, adapter_for) -> None:
    engine.load(adapter_for("known", "compacter"))
    with pytest.raises(UnknownTask, match="nope"):
        engine.generate(["known", "nope"], ["a", "b"])
    with pytest.raises(InvalidRequest):
        engine.score(["known"], ["a"], ["b", "c"])
    assert engine.router.plan is None


def test_reupload_swaps_version_and_frees_the_old_one_after_its_last_lease(engine: Engine, adapter_for) -> None:
    v1 = engine.load(adapter_for("t", "compacter", seed=1), version=1)
    with engine.resident(["t"]) as (held, _):
        v2 = engine.load(adapter_for("t", "compacter", seed=2), version=2)
        assert held[0] == v1 and engine.registry.get("t") == v2
        assert engine.device.versions() == [v1.key] and engine.registry.resident() == 2  # v1 still in use
    assert engine.device.versions() == [] and engine.registry.resident() == 1  # only v2, in the host tier
    assert engine.generate(["t"], ["a"]).entries[0].version == 2
    assert engine.device.versions() == [v2.key]


def test_an_adapter_costs_its_own_size_whatever_else_was_loaded(engine: Engine, adapter_for) -> None:
    small = adapter_for("small", "compacter", seed=1)
    engine.load(small)
    before = engine.score(["small"], ["in"], ["out"]).scores[0]
    one = engine.device.used_bytes
    assert one == small.spec.param_count(small.geometry) * 4  # compact: its float32 parameters, nothing more
    for i in range(12):  # more adapters, with a bottleneck 8x larger and LoRA at rank 64
        engine.load(adapter_for(f"big{i}", "houlsby", seed=i, reduction_factor=4))
        engine.load(adapter_for(f"lora{i}", "lora", seed=i, rank=64))
        engine.score([f"big{i}", f"lora{i}"], ["in", "in"], ["out", "out"])
    for i in range(12):
        engine.registry.delete(f"big{i}")
        engine.registry.delete(f"lora{i}")
    assert engine.score(["small"], ["in"], ["out"]).scores[0] == pytest.approx(before, abs=1e-5)
    assert engine.device.used_bytes == one


def test_bfloat16_engine_tracks_float32(tiny_dir, adapter_for) -> None:
    e32 = Engine(load_backbone(str(tiny_dir), device="cpu"))
    e16 = Engine(load_backbone(str(tiny_dir), device="cpu", dtype="bfloat16"))
    a = adapter_for("t", "compacter", std=0.3)
    e32.load(a)
    e16.load(a)
    s32 = e32.score(["t", None], ["hello", "hello"], ["world", "world"]).scores
    s16 = e16.score(["t", None], ["hello", "hello"], ["world", "world"]).scores
    assert s16 == pytest.approx(s32, rel=0.05)


def test_too_long_targets_and_inputs_are_refused_not_truncated(backbone, adapter_for) -> None:
    engine = Engine(backbone, max_input_tokens=8)
    engine.load(adapter_for("t", "compacter"))
    assert engine.score(["t"], ["short"], ["abcdefg"]).scores[0] < 0  # 7 bytes + EOS = 8 tokens: fits
    with pytest.raises(InvalidRequest, match="target 0 has 9 tokens; the limit is 8"):
        engine.score(["t"], ["short"], ["abcdefgh"])
    with pytest.raises(InvalidRequest, match="input 1 has"):
        engine.generate(["t", "t"], ["ok", "much too long"])
