"""The backbone in half precision is the model transformers gives for that dtype, and adapters ride on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

from kronserve.backbone import load_backbone
from kronserve.engine import Engine

CASES = [("summarize: the cat sat on the mat", "cat on mat"), ("hello there", "world")]


@torch.no_grad()
def transformers_scores(model: T5ForConditionalGeneration, tokenizer) -> list[float]:
    """Summed target log-probabilities, one example at a time, straight from transformers' forward."""
    out = []
    for source, target in CASES:
        enc, labels = tokenizer(source, return_tensors="pt"), tokenizer(target, return_tensors="pt").input_ids
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).logits
        out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).sum()))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_transformers_own(tiny_dir: Path, dtype: str) -> None:
    """float16 keeps T5's `_keep_in_fp32_modules` (`wo`) in float32 as `from_pretrained(dtype=...)` does;
    bfloat16 casts everything. The bare backbone then scores exactly as that transformers model does."""
    backbone = load_backbone(str(tiny_dir), device="cpu", dtype=dtype)
    reference = T5ForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=getattr(torch, dtype)).eval()
    wo = backbone.model.decoder.block[-1].layer[-1].DenseReluDense.wo.weight.dtype
    assert wo == (torch.float32 if dtype == "float16" else torch.bfloat16)
    assert backbone.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == getattr(torch, dtype)
    assert backbone.fingerprint == load_backbone(str(tiny_dir), device="cpu").fingerprint  # dtype-independent
    engine = Engine(backbone)
    ours = [engine.score([None], [s], [t]).scores[0] for s, t in CASES]
    assert ours == transformers_scores(reference, backbone.tokenizer)


@pytest.mark.parametrize(
    ("method", "overrides"), [("pfeiffer", {}), ("lora", {"targets": ("q", "wi", "wo")}), ("compacter", {})]
)
def test_adapters_on_a_float16_backbone_track_float32(tiny_dir: Path, adapter_for, method, overrides) -> None:
    """The residual after a float32 `wo` is float32: sites and LoRA on `wo` take any input dtype, compute in the
    backbone's dtype (see README, Half precision) and stay within float16 rounding of the float32 answer."""
    a = adapter_for("t", method, std=0.3, **overrides)
    scores = {}
    for dtype in ("float32", "float16"):
        engine = Engine(load_backbone(str(tiny_dir), device="cpu", dtype=dtype))
        engine.load(a)
        scores[dtype] = [engine.score(["t"], [s], [t]).scores[0] for s, t in CASES]
        bare = [engine.score([None], [s], [t]).scores[0] for s, t in CASES]
        assert all(abs(x - y) > 0.05 for x, y in zip(scores[dtype], bare, strict=True))  # the adapter acts
    assert scores["float16"] == pytest.approx(scores["float32"], abs=0.05)
