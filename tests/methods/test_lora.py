"""LoRA: PEFT semantics per projection, per row, against a dense reference `x Wᵀ + s·x Aᵀ Bᵀ`."""

from __future__ import annotations

import math

import pytest
import torch

from kronserve.engine import Engine
from kronserve.errors import InvalidSpec
from kronserve.methods import preset
from kronserve.plan import Route


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora() -> None:
    assert preset("lora", rank=4, alpha=16.0).scale == 4.0
    assert preset("lora", rank=4, alpha=16.0, rslora=True).scale == 8.0
    assert math.isclose(preset("lora", rank=8, alpha=8.0).scale, 1.0)


def test_shapes_follow_peft_orientation(backbone) -> None:
    g = backbone.fingerprint.geometry
    shapes = preset("lora", rank=2, targets=("q", "wo")).tensor_shapes(g)
    assert shapes["encoder.0.mh.q.lora_A"] == (2, g.d_model)
    assert shapes["decoder.1.cross.q.lora_B"] == (g.d_attn, 2)
    assert shapes["decoder.0.ffn.wo.lora_A"] == (2, g.d_ff)
    assert not [k for k in shapes if ".k." in k or ".wi." in k]


def test_bad_targets_are_named() -> None:
    with pytest.raises(InvalidSpec, match="targets"):
        preset("lora", targets=("q", "gate"))


@pytest.mark.parametrize("projection", ["encoder.0.mh.q", "decoder.1.cross.v", "decoder.0.ffn.wo", "encoder.1.ffn.wi"])
def test_routed_projection_equals_dense_reference(engine: Engine, adapter_for, projection: str) -> None:
    all_targets = ("q", "k", "v", "o", "wi", "wo")
    a1 = adapter_for("l1", "lora", seed=1, std=0.1, rank=4, alpha=8.0, targets=all_targets)
    a2 = adapter_for("l2", "lora", seed=2, std=0.1, rank=2, alpha=16.0, targets=all_targets, rslora=True)
    c = adapter_for("c", "compacter", seed=3)
    for a in (a1, a2, c):
        engine.load(a)
    entries = engine.registry.acquire(["l1", "l2", "c"])
    slots = engine.hold(entries, [engine.registry.fetch(e) for e in entries])
    stack, block, site, kind = projection.split(".")
    layer = getattr(engine.backbone.model, stack).block[int(block)].layer[{"mh": 0, "cross": 1, "ffn": -1}[site]]
    owner = (
        layer.DenseReluDense if site == "ffn" else (layer.EncDecAttention if site == "cross" else layer.SelfAttention)
    )
    lin = getattr(owner, kind)
    rows = [(slots[0], a1), (-1, None), (slots[1], a2), (slots[2], None), (slots[0], a1)]
    x = torch.randn(len(rows), 3, lin.inner.in_features)
    with torch.no_grad(), engine.router.activate(engine.device.plan(Route.of([r[0] for r in rows]))):
        got = lin(x)
    w = lin.inner.weight
    for b, (_, a) in enumerate(rows):
        expect = x[b] @ w.T
        if a is not None:
            lora_a, lora_b = a.tensors[f"{projection}.lora_A"], a.tensors[f"{projection}.lora_B"]
            expect = expect + a.spec.scale * (x[b] @ lora_a.T) @ lora_b.T
        torch.testing.assert_close(got[b], expect, rtol=1e-5, atol=1e-5)
