"""Prefix tuning and MAM in the engine: against transformers' own cache arithmetic, and at their own size.

The library semantics (AdapterHub's and PEFT's numbers) are checked by tests/formats/test_golden.py; mixing with other
methods, joining a running batch, beams and swaps by tests/test_engine.py, test_running.py and test_scheduler.py,
whose method tables include prefixes of lengths 3, 5 and 7 and MAM.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from kronserve.compact import packed_bytes
from kronserve.engine import Engine

from .conftest import held_slots


def test_a_peft_positioned_prefix_equals_transformers_attending_to_it_as_cached_tokens(
    engine: Engine, adapter_for
) -> None:
    """PEFT's convention is what T5 computes when the prefix is P tokens already in the decoder's cache: the stock
    model (no plan active) given that cache is an independent reference."""
    adapter = adapter_for("p", "prefix", prefix_length=5, locations=("decoder",), positions="peft", std=0.5)
    engine.load(adapter)
    model, tok = engine.backbone.model, engine.backbone.tokenizer
    inputs, targets = ["summarize: the cat sat on the mat", "hi"], ["a cat", "hello there"]
    got = engine.score(["p", "p"], inputs, targets).scores
    heads = model.config.num_heads
    expect = []
    for x, y in zip(inputs, targets, strict=True):
        enc = tok([x], return_tensors="pt")
        labels = tok([y], return_tensors="pt").input_ids
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for layer in range(model.config.num_decoder_layers):
            k, v = (adapter.tensors[f"prefix.decoder.{layer}.mh.{kv}"] for kv in "kv")
            split = [t.view(1, 5, heads, -1).transpose(1, 2) for t in (k, v)]
            cache.self_attention_cache.update(*split, layer)
        with torch.no_grad():
            logits = model(**enc, labels=labels, **{engine._cache_kwarg: cache}).logits
        expect.append(torch.log_softmax(logits, -1)[0].gather(-1, labels[0, :, None]).sum().item())
    bare = engine.score([None, None], inputs, targets).scores
    assert got == pytest.approx(expect, abs=1e-4)
    assert min(abs(a - b) for a, b in zip(got, bare, strict=True)) > 0.1  # the prefix matters


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("prefix", {"prefix_length": 7}), ("mam", {"prefix_length": 4, "reduction_factor": 8})],
)
def test_a_prefix_task_costs_its_own_bytes_on_the_device(engine: Engine, adapter_for, method, overrides) -> None:
    adapter = adapter_for("t", method, **overrides)
    engine.load(adapter)
    held_slots(engine, ["t"])
    g = engine.geometry
    prefixed = len(adapter.spec.prefix_sites(g))
    expected = adapter.spec.prefix_length * 2 * g.d_attn * prefixed * 4  # P x (k, v) x heads·d_kv, float32
    if method == "mam":
        expected += sum(t.numel() for n, t in adapter.tensors.items() if not n.startswith("prefix.")) * 4
    assert engine.device.used_bytes == expected == packed_bytes(adapter.spec, g, torch.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_track_float32_with_prefix_rows(tiny_dir, adapter_for, dtype: str) -> None:
    from kronserve.backbone import load_backbone

    engines = [Engine(load_backbone(str(tiny_dir), device="cpu", dtype=d)) for d in ("float32", dtype)]
    adapters = [adapter_for("p", "prefix", prefix_length=5, std=1.0), adapter_for("m", "mam", prefix_length=3)]
    scores = []
    for engine in engines:
        for a in adapters:
            engine.load(a)
        scores.append(engine.score(["p", "m", None], ["hello"] * 3, ["world"] * 3).scores)
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    assert len({round(s, 2) for s in scores[0]}) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefix_rows_mixed_with_adapter_rows_on_cuda_equal_the_cpu_engine(tiny_dir, adapter_for, dtype: str) -> None:
    from kronserve.backbone import load_backbone

    from .test_engine import METHODS, std_of

    chosen = [METHODS[i] for i in (11, 12, 13, 14, 0, 9)]  # prefixes 3, 5 (PEFT), 7 (leave_out), MAM; Compacter, LoRA
    cpu = Engine(load_backbone(str(tiny_dir), device="cpu"))
    gpu = Engine(load_backbone(str(tiny_dir), device="cuda", dtype=dtype))
    tasks: list[str | None] = [None]
    for i, (method, overrides) in enumerate(chosen):
        adapter = adapter_for(f"t{i}", method, seed=i, std=std_of(method), **overrides)
        cpu.load(adapter)
        gpu.load(adapter)
        tasks.append(f"t{i}")
    inputs = [f"input number {i}" for i in range(len(tasks))]
    targets = [f"target {i}" for i in range(len(tasks))]
    expect = cpu.score(tasks, inputs, targets).scores
    got = gpu.score(tasks, inputs, targets).scores
    tolerance = {"abs": 1e-3} if dtype == "float32" else {"rel": 0.05}
    assert got == pytest.approx(expect, **tolerance)
    if dtype == "float32":
        ids = gpu.generate(tasks, inputs, max_new_tokens=6, num_beams=2).token_ids
        assert ids == cpu.generate(tasks, inputs, max_new_tokens=6, num_beams=2).token_ids
