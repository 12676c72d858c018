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


def test_a_first_start_says_what_its_training_does(demo_training) -> None:
    """Every step is a status (/readyz says it), and the log has the step, the loss and the time at least every few
    seconds and at each task's last step: a slow first start is never silent."""
    _, said = demo_training
    for task in DEMO_TASKS:
        steps = [s for s in said.statuses if s.startswith(f"training demo adapters ({task.name}: step ")]
        assert steps and steps[0].startswith(f"training demo adapters ({task.name}: step 1 of at most ")
        numbers = [int(s.split("step ")[1].split(" ")[0]) for s in steps]
        assert numbers == list(range(1, len(numbers) + 1))
        lines = [line for line in said.logs if line.startswith(f"demo adapter '{task.name}': step ")]
        assert lines and all(", loss " in line and line.endswith(" s") for line in lines)


def test_readyz_says_what_the_engines_start_up_is_doing() -> None:
    """The engine process tells its supervisor each start-up phase; the API process's /readyz answer names it."""
    import asyncio

    from kronserve.config import Settings
    from kronserve.core.client import EngineClient
    from kronserve.errors import NotReady

    async def refusal() -> str:
        client = EngineClient(Settings(), "inproc://unused", "inproc://unused-status")
        await client._follow("starting", 1, None, 0)
        before = await _refused(client)
        await client._follow("starting", 1, "training demo adapters (topic: step 7 of at most 96)", 0)
        return before + " | " + await _refused(client)

    async def _refused(client: EngineClient) -> str:
        try:
            await client.readiness()
        except NotReady as e:
            return str(e)
        raise AssertionError("ready while starting")

    assert asyncio.run(refusal()) == (
        "not ready: the engine is starting (loading the backbone and the store) | "
        "not ready: the engine is starting (training demo adapters (topic: step 7 of at most 96))"
    )
