"""Imported adapters give the numbers their training libraries give (fixtures: scripts/golden/README.md).

Expected log-likelihoods and greedy outputs were computed by AdapterHub `adapters` 1.3.0 and PEFT on
transformers 4.57.6; these tests need neither library.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.errors import InvalidAdapter, InvalidSpec
from kronserve.formats.adapterhub import spec_from_config
from kronserve.formats.importers import read_source, to_adapter
from kronserve.formats.native import dumps, loads

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["fixtures"]
IMPORTABLE = [
    n
    for n, f in EXPECTED.items()
    if f["format"] in ("adapterhub", "peft") and not f.get("expect_refusal") and not f.get("kronserve_refuses")
]
# Saved by the library, refused by kronserve naming this option (with the library's numbers when it has any).
REFUSED = {n: f["kronserve_refuses"] for n, f in EXPECTED.items() if f.get("kronserve_refuses")}


@pytest.fixture(scope="module")
def golden_engine() -> Engine:
    engine = Engine(load_backbone(str(GOLDEN / "backbone"), device="cpu"))
    for name in IMPORTABLE:
        task = name.replace("_", "-")
        engine.load(to_adapter(read_source(GOLDEN / EXPECTED[name]["dir"]), task, engine.backbone.fingerprint))
    return engine


def test_bare_backbone_matches_the_reference(golden_engine: Engine) -> None:
    cases = EXPECTED["bare"]["cases"]
    got = golden_engine.score([None] * len(cases), [c["input"] for c in cases], [c["target"] for c in cases]).scores
    assert got == pytest.approx([c["loglik"] for c in cases], abs=1e-4)


@pytest.mark.parametrize("name", IMPORTABLE)
def test_score_and_greedy_equal_the_library(golden_engine: Engine, name: str) -> None:
    task, cases = name.replace("_", "-"), EXPECTED[name]["cases"]
    for case in cases:
        score = golden_engine.score([task], [case["input"]], [case["target"]]).scores[0]
        assert score == pytest.approx(case["loglik"], abs=1e-4), case["input"]
        out = golden_engine.generate([task], [case["input"]], max_new_tokens=8)
        assert out.token_ids[0] == generated(case["greedy_ids"])
        assert out.outputs[0] == case["greedy_text"]


def test_mixed_batch_of_every_imported_adapter_gives_the_same_numbers(golden_engine: Engine) -> None:
    rows = [(n.replace("_", "-"), c) for n in IMPORTABLE for c in EXPECTED[n]["cases"]]
    rows += [(None, c) for c in EXPECTED["bare"]["cases"]]
    random.Random(1).shuffle(rows)
    tasks, inputs, targets = [t for t, _ in rows], [c["input"] for _, c in rows], [c["target"] for _, c in rows]
    scores = golden_engine.score(tasks, inputs, targets).scores
    assert scores == pytest.approx([c["loglik"] for _, c in rows], abs=1e-4)
    ids = golden_engine.generate(tasks, inputs, max_new_tokens=8).token_ids
    assert ids == [generated(c["greedy_ids"]) for _, c in rows]


def generated(sequence: list[int]) -> list[int]:
    """The library's sequence less its decoder start token, through its EOS (id 1): what the engine returns."""
    tokens = sequence[1:]
    return tokens[: tokens.index(1) + 1] if 1 in tokens else tokens


def test_imported_specs_carry_the_library_options(golden_engine: Engine) -> None:
    spec = {e.task: e.spec for e in golden_engine.registry.entries()}
    assert spec["compacter"].method == "compacter" and spec["compacter"].activation == "gelu"
    assert spec["compacterpp"].placement == "pfeiffer" and spec["compacterpp"].sites == ("ffn",)
    assert spec["compacter-variant"].factorized_rule and spec["compacter-variant"].rank == 2
    assert spec["compacter-variant"].leave_out == (1,)
    assert spec["double-seq-bn"].activation == "swish" and spec["double-seq-bn-variant"].scaling == 2.0
    assert spec["par-bn"].placement == "parallel" and spec["par-bn"].scaling == 4.0
    assert spec["lora-variant"].rslora and spec["lora-variant"].scale == 8.0
    assert spec["lora"].targets == ("q", "v")
    # residual_before_ln / original_ln_after as AdapterHub computes them on T5 (see _placement):
    assert spec["seq-bn-residual-after-add"].placement == "pfeiffer"
    assert spec["double-seq-bn-residual-false"].placement == "houlsby"
    assert spec["par-bn-ln-options"].placement == "parallel"
    # prefix tuning: AdapterHub's locations and leave_out, PEFT's positions; MAM's parallel adapter
    assert spec["prefix"].locations == ("encoder", "decoder", "cross") and spec["prefix"].prefix_length == 5
    assert spec["prefix-self-only"].locations == ("decoder",) and spec["prefix-leave-out"].leave_out == (0, 3)
    assert spec["prefix-flat"].positions == spec["prefix-ejected"].positions == "adapterhub"
    assert (spec["peft-prefix"].locations, spec["peft-prefix"].positions) == (("decoder",), "peft")
    mam = spec["mam"]
    assert (mam.method, mam.placement, mam.sites, mam.scaling, mam.activation) == (
        "mam",
        "parallel",
        ("ffn",),
        4.0,
        "relu",
    )
    assert (mam.reduction_factor, mam.prefix_length, mam.prefix_locations) == (2, 10, ("encoder", "decoder", "cross"))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_placement_kronserve_does_not_serve_is_refused_by_its_option(golden_engine: Engine, name: str) -> None:
    """seq_bn_residual_twice: AdapterHub computes 2x + f + A(x + f) (its numbers are in expected.json and
    check_fixtures.py reproduces them); seq_bn_post_add: AdapterHub's own forward fails on T5."""
    with pytest.raises(InvalidSpec, match=f"AdapterHub option {REFUSED[name]}="):
        to_adapter(read_source(GOLDEN / EXPECTED[name]["dir"]), "x", golden_engine.backbone.fingerprint)


@pytest.mark.parametrize(
    ("options", "placement"),
    [
        ({"original_ln_before": True, "residual_before_ln": True, "original_ln_after": True}, "pfeiffer"),
        ({"original_ln_before": True, "residual_before_ln": False, "original_ln_after": False}, "pfeiffer"),
        ({"original_ln_before": False, "residual_before_ln": False, "original_ln_after": True}, "houlsby"),
        ({"original_ln_before": False, "residual_before_ln": True, "original_ln_after": True}, "houlsby"),
        ({"is_parallel": True, "original_ln_before": True, "residual_before_ln": False}, "parallel"),
        ({"original_ln_before": True, "residual_before_ln": False, "original_ln_after": True}, "residual_before_ln"),
        ({"original_ln_before": True, "residual_before_ln": "post_add"}, "residual_before_ln"),
        ({"original_ln_before": False, "residual_before_ln": "post_add"}, "residual_before_ln"),
        ({"original_ln_before": True, "residual_before_ln": 1}, "residual_before_ln"),
        ({"original_ln_before": True, "residual_before_ln": True, "original_ln_after": False}, "original_ln_after"),
        ({"original_ln_before": False, "original_ln_after": False}, "original_ln_after"),
        ({"is_parallel": True, "original_ln_after": False}, "original_ln_after"),
    ],
)
def test_every_residual_option_is_served_as_adapterhub_computes_it_or_refused(options, placement) -> None:
    """Each combination against AdapterHub's T5 forward as written in check_fixtures.py's docstring (adapters
    1.3.0 `methods/modeling.py`): the served ones have a golden fixture above or equal one by the formula."""
    cfg = json.loads((GOLDEN / "seq_bn" / "adapter_config.json").read_text())
    cfg["config"] = {**cfg["config"], **options}
    if placement in ("pfeiffer", "houlsby", "parallel"):
        assert spec_from_config(cfg).placement == placement
    else:
        with pytest.raises(InvalidSpec, match=f"AdapterHub option {placement}="):
            spec_from_config(cfg)


def test_the_declared_base_model_is_recorded_in_the_native_file_and_described(golden_engine: Engine) -> None:
    """PEFT's base_model_name_or_path and AdapterHub's model_name ("backbone" in these saves) are kept."""
    fingerprint = golden_engine.backbone.fingerprint
    for name in ("lora", "seq_bn"):
        adapter = to_adapter(read_source(GOLDEN / name), "x", fingerprint)
        assert adapter.base_model == EXPECTED[name]["library_config"].get("model_name", "backbone") == "backbone"
        assert loads(dumps(adapter), fingerprint).base_model == "backbone"
    described = {e.task: e.describe()["base_model"] for e in golden_engine.registry.entries()}
    assert described["lora"] == described["compacter"] == "backbone"
    bare = replace(adapter, base_model=None)
    assert loads(dumps(bare), fingerprint).base_model is None


def test_compacter_saved_without_its_shared_rule_is_refused(golden_engine: Engine) -> None:
    parts = read_source(GOLDEN / "compacter_missing_rule")
    with pytest.raises(InvalidAdapter, match="shared phm rule is missing"):
        to_adapter(parts, "x", golden_engine.backbone.fingerprint)


def test_pickle_can_be_refused(golden_engine: Engine) -> None:
    from kronserve.errors import UnsupportedFormat

    parts = read_source(GOLDEN / "compacter")
    with pytest.raises(UnsupportedFormat, match="kronserve import"):
        to_adapter(parts, "x", golden_engine.backbone.fingerprint, allow_pickle=False)
