"""Paper checkpoints: a whole-model state dict in `rabeehk/compacter`'s key layout (see DESIGN.md §3).

No checkpoint of the paper's code can be fetched here, so the file is written in its documented layout
from a known adapter; the test checks the import recovers that adapter's spec, tensors and answers.
"""

from __future__ import annotations

import io
import re

import pytest
import torch

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.errors import BackboneMismatch, InvalidAdapter
from kronserve.formats.importers import to_adapter
from kronserve.formats.native import AdapterFile
from kronserve.formats.paper import check_backbone

SITE_LAYER = {"encoder": {"mh": 0, "ffn": 1}, "decoder": {"mh": 0, "ffn": 2}}


def paper_state(engine: Engine, adapter, task: str) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in engine.backbone.weights.items()}  # the whole frozen model, as the paper saves it
    for key, t in adapter.tensors.items():
        if key.startswith("layer_norm."):
            _, stack, *rest = key.split(".")
            if rest == ["final"]:
                state[f"{stack}.final_layer_norm.weight"] = t
            else:
                state[f"{stack}.block.{rest[0]}.layer.{SITE_LAYER[stack].get(rest[1], 1)}.layer_norm.weight"] = t
        elif key == "phm_rule":
            for site in adapter.spec.active_sites(adapter.geometry):  # the paper's modules each hold the shared rule
                stack, block, kind = site.split(".")
                for proj in ("down_sampler", "up_sampler"):
                    prefix = f"{stack}.block.{block}.layer.{SITE_LAYER[stack][kind]}.adapter_controller.adapters"
                    state[f"{prefix}.{task}.{proj}.phm_rule"] = t
        else:
            stack, block, kind, proj, leaf = key.split(".")
            layer = SITE_LAYER[stack][kind]
            sampler = "down_sampler" if proj == "down" else "up_sampler"
            state[f"{stack}.block.{block}.layer.{layer}.adapter_controller.adapters.{task}.{sampler}.{leaf}"] = t
    return state


@pytest.mark.parametrize("method", ["compacter", "compacter++"])
def test_paper_checkpoint_imports_adapters_rule_and_layer_norms(engine: Engine, adapter_for, method: str) -> None:
    original = adapter_for("rte", method, seed=3, std=0.2, layer_norms=True, activation="gelu_new")
    buf = io.BytesIO()
    torch.save(paper_state(engine, original, "rte"), buf)
    bb = engine.backbone
    imported = to_adapter({"pytorch_model.bin": buf.getvalue()}, "rte", bb.fingerprint, True, bb.weights)
    assert imported.spec == original.spec
    assert imported.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(imported.tensors[k], v) for k, v in original.tensors.items())
    engine.load(imported)
    engine.load(AdapterFile("orig", original.spec, original.fingerprint, original.tensors))
    scores = engine.score(["rte", "orig", None], ["premise"] * 3, ["entailment"] * 3).scores
    assert scores[0] == scores[1] and scores[0] != pytest.approx(scores[2], abs=1e-3)


def test_paper_checkpoint_with_two_tasks_needs_a_name(engine: Engine, adapter_for) -> None:
    a = adapter_for("rte", "compacter++", seed=1)
    state = paper_state(engine, a, "rte") | paper_state(engine, a, "mrpc")
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(InvalidAdapter, match=r"tasks \['mrpc', 'rte'\]"):
        to_adapter({"pytorch_model.bin": buf.getvalue()}, "other", engine.backbone.fingerprint)
    assert to_adapter({"pytorch_model.bin": buf.getvalue()}, "mrpc", engine.backbone.fingerprint).task == "mrpc"


def test_a_checkpoint_trained_on_another_backbone_is_refused(engine: Engine, adapter_for, other_tiny_dir) -> None:
    """The checkpoint carries its frozen backbone: same shapes, other weights is proof of another backbone."""
    state = paper_state(engine, adapter_for("rte", "compacter", seed=1), "rte")
    other = load_backbone(str(other_tiny_dir), device="cpu").weights
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert check_backbone(state, engine.backbone.weights) == len(
        [k for k in state if "adapter_controller" not in k and "layer_norm" not in k]
    )
    buf = io.BytesIO()
    torch.save(state | {q: other[q]}, buf)
    with pytest.raises(BackboneMismatch, match=re.escape(f"its {q} differs")):
        to_adapter(
            {"pytorch_model.bin": buf.getvalue()}, "rte", engine.backbone.fingerprint, True, engine.backbone.weights
        )


def test_the_same_backbone_served_in_half_precision_is_the_same_backbone(engine: Engine, adapter_for, tiny_dir) -> None:
    state = paper_state(engine, adapter_for("rte", "compacter", seed=1), "rte")  # float32 weights
    served = load_backbone(str(tiny_dir), device="cpu", dtype="bfloat16").weights
    assert check_backbone(state, served) > 0
    nudged = state["shared.weight"] * (1 + 2 * torch.finfo(torch.bfloat16).eps)
    with pytest.raises(BackboneMismatch, match=r"shared\.weight"):
        check_backbone(state | {"shared.weight": nudged}, served)
