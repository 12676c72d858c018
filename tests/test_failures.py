"""Failures stay with the requests they concern: joiners whose rows cannot join, an adapter that raises in a decode
step, an adapter whose logits overflow. Every other request is answered exactly as it would be alone, and every
lease and device slot is released."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from kronserve.engine import Engine
from kronserve.errors import KronserveError
from kronserve.messages import GenerationParams
from kronserve.running import RunningBatch

from .test_scheduler import GEN, alone, ask, make, step_gate

LONG = GenerationParams(max_new_tokens=10, min_new_tokens=10)


@pytest.fixture
def tasks(engine: Engine, adapter_for) -> list[str]:
    for i, method in enumerate(("compacter", "lora", "houlsby")):
        engine.load(adapter_for(f"f{i}", method, seed=i))
    return ["f0", "f1", "f2"]


async def queued(s, n: int) -> None:
    """Until `n` requests wait in the loop's queue (bounded by the test's timeout, not by a sleep)."""
    while s.loop.waiting < n:
        await asyncio.sleep(0.005)


def released(engine: Engine) -> bool:
    held, held_bytes, _ = engine.device.leased()
    return engine.registry._refs.total() == 0 and not held and held_bytes == 0


def test_joiners_whose_rows_cannot_join_fail_alone_and_release_their_leases(engine: Engine, tasks, monkeypatch):
    """`RunningBatch.concatenate` raises (out of memory in torch.cat) when two requests join a running one: the
    joiners get the error, the running request's answer is unchanged."""
    reached, release = step_gate(engine, at=3)

    def no_memory(self, other):
        raise RuntimeError("out of memory (simulated) while joining rows")

    async def run():
        s = make(engine)
        s.start()
        running = asyncio.ensure_future(ask(s, tasks[0], ["the long one"], LONG))
        await asyncio.to_thread(reached.wait, 20)
        monkeypatch.setattr(RunningBatch, "concatenate", no_memory)
        joiners = [asyncio.ensure_future(ask(s, t, ["a joiner", "two inputs"], GEN)) for t in tasks[1:3]]
        await queued(s, 2)
        release.set()
        out = await asyncio.gather(running, *joiners, return_exceptions=True)
        monkeypatch.undo()
        after = await ask(s, tasks[1], ["a joiner"], GEN)  # the loop still serves
        await s.drain_and_stop()
        return out, after

    (first, *joined), after = asyncio.run(run())
    assert first == [alone(engine, tasks[0], "the long one", LONG)]
    assert all(isinstance(j, RuntimeError) and "out of memory" in str(j) for j in joined), joined
    assert after == [alone(engine, tasks[1], "a joiner", GEN)]
    assert released(engine)


def test_an_adapter_that_raises_in_a_step_fails_only_its_own_requests(engine: Engine, tasks):
    """The step raises whenever task 2's rows are in it: its two requests fail with an error naming it; the other
    tasks' rows, stepped again without it, equal their runs alone."""
    bad_slot: list[int] = []
    original = engine.step

    def step(batch):
        if bad_slot and bad_slot[0] in batch.slots:
            raise RuntimeError("illegal memory access (simulated)")
        return original(batch)

    async def run():
        s = make(engine, wait_s=0.05)
        s.start()
        engine.step = step  # type: ignore[method-assign]
        (entry,) = engine.registry.acquire([tasks[2]])
        bad_slot.append(engine.hold([entry], [engine.registry.fetch(entry)])[0])
        asks = [ask(s, t, ["some input", "another"], LONG) for t in (tasks[0], tasks[2], tasks[1], tasks[2])]
        out = await asyncio.gather(*asks, return_exceptions=True)
        engine.release(bad_slot)
        engine.registry.release([entry])
        await s.drain_and_stop()
        return out

    good0, bad1, good2, bad3 = asyncio.run(run())
    for bad in (bad1, bad3):
        assert isinstance(bad, KronserveError) and repr(tasks[2]) in str(bad) and "illegal memory" in str(bad), bad
    assert good0 == [alone(engine, tasks[0], x, LONG) for x in ("some input", "another")]
    assert good2 == [alone(engine, tasks[1], x, LONG) for x in ("some input", "another")]
    assert released(engine)


def test_an_adapter_whose_logits_overflow_fails_with_a_clear_error_not_an_empty_answer(engine: Engine, adapter_for):
    """Finite weights that overflow at run time (every weight 1e38): NaN logits. The request is refused with
    an error naming non-finite values; a neighbour in the same steps is answered as alone."""
    overflow = adapter_for("overflow", "houlsby", seed=1)
    huge = {k: torch.full_like(v, 1e38) if k.endswith("weight") else v for k, v in overflow.tensors.items()}
    engine.load(dataclasses.replace(overflow, tensors=huge))
    engine.load(adapter_for("fine", "houlsby", seed=2))

    async def run():
        s = make(engine, wait_s=0.05)
        s.start()
        out = await asyncio.gather(
            ask(s, "overflow", ["hello"], LONG), ask(s, "fine", ["hello"], LONG), return_exceptions=True
        )
        await s.drain_and_stop()
        return out

    bad, good = asyncio.run(run())
    assert isinstance(bad, KronserveError) and "non-finite" in str(bad) and "'overflow'" in str(bad), bad
    assert good == [alone(engine, "fine", "hello", LONG)]
    assert released(engine)
