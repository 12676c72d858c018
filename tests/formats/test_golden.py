"""Imported adapters give the numbers their training libraries give (fixtures: scripts/golden/README.md).

Expected log-likelihoods and greedy outputs were computed by AdapterHub `adapters` 1.3.0 and PEFT on
transformers 4.57.6; these tests need neither library.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.errors import InvalidAdapter
from kronserve.formats.importers import read_source, to_adapter

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["fixtures"]
IMPORTABLE = [n for n, f in EXPECTED.items() if f["format"] in ("adapterhub", "peft") and not f.get("expect_refusal")]


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
        assert score == pytest.approx(case["loglik"], abs=1e-3), case["input"]
        out = golden_engine.generate([task], [case["input"]], max_new_tokens=8)
        assert out.token_ids[0] == generated(case["greedy_ids"])
        assert out.outputs[0] == case["greedy_text"]


def test_mixed_batch_of_every_imported_adapter_gives_the_same_numbers(golden_engine: Engine) -> None:
    rows = [(n.replace("_", "-"), c) for n in IMPORTABLE for c in EXPECTED[n]["cases"]]
    rows += [(None, c) for c in EXPECTED["bare"]["cases"]]
    random.Random(1).shuffle(rows)
    tasks, inputs, targets = [t for t, _ in rows], [c["input"] for _, c in rows], [c["target"] for _, c in rows]
    scores = golden_engine.score(tasks, inputs, targets).scores
    assert scores == pytest.approx([c["loglik"] for _, c in rows], abs=1e-3)
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


def test_compacter_saved_without_its_shared_rule_is_refused(golden_engine: Engine) -> None:
    parts = read_source(GOLDEN / "compacter_missing_rule")
    with pytest.raises(InvalidAdapter, match="shared phm rule is missing"):
        to_adapter(parts, "x", golden_engine.backbone.fingerprint)


def test_pickle_can_be_refused(golden_engine: Engine) -> None:
    from kronserve.errors import UnsupportedFormat

    parts = read_source(GOLDEN / "compacter")
    with pytest.raises(UnsupportedFormat, match="kronserve import"):
        to_adapter(parts, "x", golden_engine.backbone.fingerprint, allow_pickle=False)
