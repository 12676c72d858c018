"""The demo tasks' cache: trained once per backbone and recipe, reused after, trained anew when the recipe changes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from kronserve import demo
from kronserve.backbone import DEMO_BACKBONE, load_backbone
from kronserve.demo import DEMO_TASKS, SENTIMENT, cache_folder, demo_adapters, training_inputs
from kronserve.formats.native import load


def test_a_second_start_reuses_the_trained_files(demo_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = demo_cache / DEMO_BACKBONE
    fp = load_backbone(str(source), "cpu").fingerprint
    before = {p: p.stat().st_mtime_ns for p in cache_folder(demo_cache, fp).iterdir()}
    with caplog.at_level(logging.INFO, logger="kronserve.demo"):
        files = demo_adapters(str(source), fp, demo_cache)
    assert "training demo adapters" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in cache_folder(demo_cache, fp).iterdir()} == before
    assert sorted(files) == [t.name for t in DEMO_TASKS]
    assert sorted(before) == sorted(files.values())  # no data file or half-written .part left behind
    for task, path in files.items():
        adapter = load(path, fp)
        assert (adapter.task, adapter.spec.method) == (task, demo.RECIPE.method)


def test_a_recipe_change_trains_anew(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fp = load_backbone(str(demo_cache / DEMO_BACKBONE), "cpu").fingerprint
    folder = cache_folder(demo_cache, fp)
    monkeypatch.setattr(demo, "RECIPE", dataclasses.replace(demo.RECIPE, lr=demo.RECIPE.lr / 2))
    assert cache_folder(demo_cache, fp) != folder
    monkeypatch.undo()
    monkeypatch.setattr(demo, "TRAIN_EXAMPLES", demo.TRAIN_EXAMPLES + 1)
    assert cache_folder(demo_cache, fp) != folder


def test_held_out_rows_are_reproducible_and_never_trained_on() -> None:
    held = SENTIMENT.examples(64, seed=1, exclude=training_inputs(SENTIMENT))
    assert held == SENTIMENT.examples(64, seed=1, exclude=training_inputs(SENTIMENT))
    assert not {e.input for e in held} & training_inputs(SENTIMENT)
    assert {e.target for e in held} == {"positive", "negative"}
    with pytest.raises(ValueError, match="fewer than"):
        SENTIMENT.examples(2000, seed=0)  # 1,168 distinct inputs exist
