"""The dynamic batcher in-process: mixing, overload, timeouts, and one bad request never failing a batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kronserve.engine import Engine
from kronserve.errors import Overloaded, RequestTimeout, UnknownTask
from kronserve.metrics import Metrics
from kronserve.registry import Entry
from kronserve.scheduler import BatchKey, Scheduler

GEN = BatchKey("generate", max_new_tokens=4, num_beams=1)


def entry(engine: Engine, task: str) -> Entry:
    """The task's version, leased as the API does at admission (released when the test's engine goes)."""
    return engine.registry.acquire([task])[0]


def make(engine: Engine, **kw) -> Scheduler:
    opts = dict(max_rows=64, max_tokens=100_000, wait_ms=50, queue_size=64, timeout_s=30) | kw
    return Scheduler(engine, Metrics(), **opts)


@pytest.fixture
def tasks(engine: Engine, adapter_for) -> list[str]:
    names = [f"t{i}" for i in range(4)]
    for i, n in enumerate(names):
        engine.load(adapter_for(n, ["compacter", "houlsby", "pfeiffer", "phm"][i], seed=i, reduction_factor=16))
    return names


def gate(engine: Engine) -> threading.Event:
    """Hold every engine call until the returned event is set."""
    release = threading.Event()
    original = engine.generate_leased

    def held(*a, **kw):
        release.wait(10)
        return original(*a, **kw)

    engine.generate_leased = held  # type: ignore[method-assign]
    return release


def test_concurrent_requests_of_different_tasks_share_one_batch(engine: Engine, tasks: list[str]) -> None:
    async def run() -> list:
        s = make(engine)
        s.start()
        jobs = [s.submit(GEN, entry(engine, tasks[i % 4]), [f"in {i}"], None, 5) for i in range(8)]
        out = await asyncio.gather(*jobs)
        await s.drain_and_stop()
        return [out, s.metrics]

    out, metrics = asyncio.run(run())
    assert [r.task for r in out] == [tasks[i % 4] for i in range(8)]
    sample = metrics.registry.get_sample_value
    assert sample("kronserve_batch_tasks_count") == 1 and sample("kronserve_batch_tasks_sum") == 4
    assert sample("kronserve_batch_rows_sum") == 8
    alone = [engine.generate([tasks[i % 4]], [f"in {i}"], max_new_tokens=4).outputs for i in range(8)]
    assert [r.values for r in out] == alone


def test_rows_bound_splits_batches(engine: Engine, tasks: list[str]) -> None:
    async def run() -> Metrics:
        s = make(engine, max_rows=3)
        s.start()
        await asyncio.gather(*(s.submit(GEN, entry(engine, tasks[0]), ["a", "b"], None, 4) for _ in range(3)))
        await s.drain_and_stop()
        return s.metrics

    metrics = asyncio.run(run())
    sample = metrics.registry.get_sample_value
    assert sample("kronserve_batch_rows_sum") == 6 and sample("kronserve_batch_rows_count") == 3


def test_full_queue_is_refused_fast_and_accepted_work_completes(engine: Engine, tasks: list[str]) -> None:
    release = gate(engine)

    async def run() -> tuple[list, BaseException]:
        s = make(engine, queue_size=2, wait_ms=0)
        s.start()
        first = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[0]), ["a"], None, 2))
        await asyncio.sleep(0.1)  # the first is now inside the (held) engine
        queued = [asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[1]), ["b"], None, 2)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await s.submit(GEN, entry(engine, tasks[2]), ["c"], None, 2)
        release.set()
        done = await asyncio.gather(first, *queued)
        await s.drain_and_stop()
        return done, refused.value

    done, refused = asyncio.run(run())
    assert len(done) == 3 and refused.retry_after >= 1


def test_task_deleted_while_queued_still_answers_with_its_version(engine: Engine, tasks: list[str]) -> None:
    before = engine.generate([tasks[2]], ["x"], max_new_tokens=4).outputs
    release = gate(engine)

    async def run() -> list:
        s = make(engine, wait_ms=0)
        s.start()
        blocker = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[0]), ["a"], None, 2))
        await asyncio.sleep(0.1)
        accepted = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[2]), ["x"], None, 2))
        await asyncio.sleep(0.05)
        gone = engine.registry.delete(tasks[2])
        assert engine.bank.loaded() == 4  # the deleted version stays resident while a request holds it
        release.set()
        out = await asyncio.gather(blocker, accepted)
        await s.drain_and_stop()
        return [*out, gone]

    blocker, accepted, gone = asyncio.run(run())
    assert blocker.task == tasks[0]
    assert accepted.task == tasks[2] and accepted.version == gone.version and accepted.values == before
    with pytest.raises(UnknownTask):
        engine.registry.acquire([tasks[2]])


def test_request_that_waits_too_long_times_out(engine: Engine, tasks: list[str]) -> None:
    release = gate(engine)

    async def run() -> None:
        s = make(engine, timeout_s=0.2, wait_ms=0)
        s.start()
        with pytest.raises(RequestTimeout):
            await s.submit(GEN, entry(engine, tasks[0]), ["a"], None, 2)
        release.set()
        await s.drain_and_stop()

    asyncio.run(run())


def test_a_request_whose_caller_gave_up_is_dropped_not_run(engine: Engine, tasks: list[str]) -> None:
    """The cluster gateway cancels a call it re-sends elsewhere: the queued job must not run after its lease ends."""
    release = gate(engine)
    rows_run: list[int] = []
    original = engine.generate_leased

    def counted(entries, inputs, *a, **kw):
        rows_run.append(len(inputs))
        return original(entries, inputs, *a, **kw)

    engine.generate_leased = counted  # type: ignore[method-assign]

    async def run() -> None:
        s = make(engine, wait_ms=0)
        s.start()
        first = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[0]), ["a"], None, 2))
        await asyncio.sleep(0.1)  # the first is now inside the (held) engine
        abandoned = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[1]), ["b", "c"], None, 4))
        kept = asyncio.ensure_future(s.submit(GEN, entry(engine, tasks[2]), ["d"], None, 2))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        release.set()
        await asyncio.gather(first, kept)
        assert abandoned.cancelled()
        await s.drain_and_stop()

    asyncio.run(run())
    assert rows_run == [1, 1]  # the first alone, then only the kept request: the abandoned two rows never ran
