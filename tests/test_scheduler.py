"""The step loop in-process: rows join and leave a running batch and each still equals its run alone.

The reference for every output is `Engine.generate` (one Hugging Face `generate()` for that request
alone); `step_gate` holds the loop inside a chosen decode step, so a request provably joins mid-generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch

from kronserve.engine import Engine
from kronserve.errors import Overloaded, RequestTimeout, UnknownTask
from kronserve.loop import Bounds
from kronserve.messages import GenerationParams
from kronserve.metrics import Metrics
from kronserve.scheduler import Scheduler

from .test_engine import INPUTS, METHODS, std_of


def make(engine: Engine, queue_size: int = 64, timeout_s: float = 30, **bounds) -> Scheduler:
    b = dict(rows=64, pass_tokens=100_000, cached_tokens=1_000_000, wait_s=0.0) | bounds
    return Scheduler(engine, Metrics(), Bounds(**b), queue_size, timeout_s)


async def ask(s: Scheduler, task: str, inputs: list[str], params: GenerationParams | None = None, targets=None):
    """Submit as the service does: tokenized, leased at acceptance."""
    (entry,) = s.engine.registry.acquire([task])
    tok = s.engine.tokenize
    if targets is not None:
        return await s.submit(entry, tok(inputs), tok(targets, "target"))
    return [s.engine.decode(o.ids) for o in await s.submit(entry, tok(inputs), None, params or GEN)]


GEN = GenerationParams(max_new_tokens=4)


def step_gate(engine: Engine, at: int) -> tuple[threading.Event, threading.Event]:
    """(reached, release): the loop signals `reached` when it enters decode step `at`, then waits for `release`."""
    reached, release, calls = threading.Event(), threading.Event(), [0]
    original = engine.step

    def gated(batch):
        calls[0] += 1
        if calls[0] == at:
            reached.set()
            release.wait(20)
        return original(batch)

    engine.step = gated  # type: ignore[method-assign]
    return reached, release


@pytest.fixture
def tasks(engine: Engine, adapter_for) -> list[str]:
    names = []
    for i, (method, overrides) in enumerate(METHODS):
        engine.load(adapter_for(f"m{i}", method, seed=i, std=std_of(method), **overrides))
        names.append(f"m{i}")
    return names


def alone(engine: Engine, task: str | None, text: str, p: GenerationParams) -> str:
    return engine.generate([task], [text], p.max_new_tokens, p.num_beams, p.min_new_tokens).outputs[0]


def alone_ids(engine: Engine, task: str | None, text: str, p: GenerationParams) -> list[int]:
    return engine.generate([task], [text], p.max_new_tokens, p.num_beams, p.min_new_tokens).token_ids[0]


def test_rows_joining_mid_generation_equal_their_runs_alone_for_every_method(engine: Engine, tasks) -> None:
    """A long request runs; at its 3rd step every method joins (different lengths, so rows leave around it)."""
    long = GenerationParams(max_new_tokens=24, min_new_tokens=24)
    joiners = [
        (t, INPUTS[i % len(INPUTS)], GenerationParams(max_new_tokens=3 + i, min_new_tokens=i % 4))
        for i, t in enumerate(tasks)
    ]
    reached, release = step_gate(engine, at=3)

    async def run():
        s = make(engine)
        s.start()
        first = asyncio.ensure_future(ask(s, tasks[0], ["the long one"], long))
        await asyncio.to_thread(reached.wait, 20)
        joined = [asyncio.ensure_future(ask(s, t, [x], p)) for t, x, p in joiners]
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(first, *joined)
        await s.drain_and_stop()
        return out, s.metrics

    out, metrics = asyncio.run(run())
    assert out[0] == [alone(engine, tasks[0], "the long one", long)]
    for (t, x, p), got in zip(joiners, out[1:], strict=True):
        assert got == [alone(engine, t, x, p)], (t, p)
    sample = metrics.registry.get_sample_value
    # Requests of different tasks and settings shared decode steps.
    assert sample("kronserve_step_tasks_sum") > sample("kronserve_step_tasks_count")
    assert sample("kronserve_step_rows_sum") >= 3 * sample("kronserve_step_rows_count") // 2


def test_token_ids_of_a_joined_row_equal_hf_generate_alone(engine: Engine, tasks) -> None:
    """Ids, not just text: the byte tokenizer drops ids when decoding, so compare what the loop produced."""
    seen: list[list[int]] = []
    original = engine.decode
    engine.decode = lambda ids: (seen.append(list(ids)), original(ids))[1]  # type: ignore[method-assign]
    reached, release = step_gate(engine, at=2)
    p_long, p_short = GenerationParams(max_new_tokens=12, min_new_tokens=12), GenerationParams(max_new_tokens=6)

    async def run():
        s = make(engine)
        s.start()
        first = asyncio.ensure_future(ask(s, tasks[3], [INPUTS[0]], p_long))
        await asyncio.to_thread(reached.wait, 20)
        second = asyncio.ensure_future(ask(s, tasks[9], [INPUTS[2]], p_short))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, second)
        await s.drain_and_stop()

    asyncio.run(run())
    assert sorted(seen) == sorted(
        [alone_ids(engine, tasks[3], INPUTS[0], p_long), alone_ids(engine, tasks[9], INPUTS[2], p_short)]
    )


def test_beam_search_in_the_loop_equals_hf_beam_search_alone(engine: Engine, tasks) -> None:
    beams = [
        GenerationParams(max_new_tokens=8, num_beams=3),
        GenerationParams(max_new_tokens=6, num_beams=2, min_new_tokens=4),
    ]
    reached, release = step_gate(engine, at=2)

    async def run():
        s = make(engine)
        s.start()
        greedy = asyncio.ensure_future(ask(s, tasks[1], ["greedy neighbour"], GenerationParams(max_new_tokens=10)))
        await asyncio.to_thread(reached.wait, 20)
        found = [asyncio.ensure_future(ask(s, tasks[i], INPUTS[:2], p)) for i, p in searched]
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(*found, greedy)
        await s.drain_and_stop()
        return out

    # Compacter, LoRA, a prefix (P 3) and MAM: each request's beams share its adapter or prefix.
    searched = ((0, beams[0]), (9, beams[1]), (11, beams[0]), (14, beams[1]))
    *found, greedy = asyncio.run(run())
    for (i, p), got in zip(searched, found, strict=True):
        assert got == [alone(engine, tasks[i], x, p) for x in INPUTS[:2]], tasks[i]
    assert greedy == [alone(engine, tasks[1], "greedy neighbour", GenerationParams(max_new_tokens=10))]


def test_sampling_is_reproducible_for_a_seed_whatever_rides_beside_it(engine: Engine, tasks) -> None:
    sampled = GenerationParams(max_new_tokens=12, min_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=7)

    async def run(with_neighbours: bool):
        s = make(engine)
        s.start()
        jobs = [ask(s, tasks[0], ["sample me", "and me"], sampled)]
        if with_neighbours:
            jobs += [ask(s, t, ["noise"], GenerationParams(max_new_tokens=5, temperature=1.0)) for t in tasks[1:6]]
        out = await asyncio.gather(*jobs)
        await s.drain_and_stop()
        return out[0]

    quiet, crowded = asyncio.run(run(False)), asyncio.run(run(True))
    assert quiet == crowded
    other_seed = GenerationParams(**{**sampled.__dict__, "seed": 8})

    async def run_other():
        s = make(engine)
        s.start()
        out = await ask(s, tasks[0], ["sample me"], other_seed)
        await s.drain_and_stop()
        return out

    assert asyncio.run(run_other()) != quiet[:1]


def test_scores_run_between_steps_without_waiting_for_a_generation(engine: Engine, tasks) -> None:
    reached, release = step_gate(engine, at=3)

    async def run():
        s = make(engine)
        s.start()
        long = asyncio.ensure_future(ask(s, tasks[0], ["long"], GenerationParams(max_new_tokens=40, min_new_tokens=40)))
        await asyncio.to_thread(reached.wait, 20)
        score = asyncio.ensure_future(ask(s, tasks[2], ["in"], None, targets=["out"]))
        release.set()
        scored = await score
        still_running = not long.done()
        await long
        await s.drain_and_stop()
        return scored, still_running

    scored, still_running = asyncio.run(run())
    assert still_running
    assert scored == pytest.approx(engine.score([tasks[2]], ["in"], ["out"]).scores, abs=1e-4)


def test_full_queue_is_refused_fast_and_accepted_work_completes(engine: Engine, tasks) -> None:
    reached, release = step_gate(engine, at=1)

    async def run():
        s = make(engine, queue_size=2)
        s.start()
        first = asyncio.ensure_future(ask(s, tasks[0], ["a"]))
        await asyncio.to_thread(reached.wait, 20)
        queued = [asyncio.ensure_future(ask(s, tasks[1], ["b"])) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await ask(s, tasks[2], ["c"])
        release.set()
        done = await asyncio.gather(first, *queued)
        await s.drain_and_stop()
        return done, refused.value

    done, refused = asyncio.run(run())
    assert len(done) == 3 and refused.retry_after >= 1
    assert engine.registry._refs.total() == 0  # every lease, the refused one's included, was released


@pytest.mark.parametrize(("method", "overrides"), [("houlsby", {}), ("prefix", {"prefix_length": 5})])
def test_swap_and_delete_mid_generation_finish_on_the_running_version(
    engine: Engine, adapter_for, method: str, overrides: dict
) -> None:
    std = max(0.6, std_of(method))
    v1 = adapter_for("swap", method, seed=1, std=std, **overrides)
    v2 = adapter_for("swap", method, seed=2, std=std, **overrides)
    engine.load(v1, version=1)
    p = GenerationParams(max_new_tokens=16, min_new_tokens=16)
    before = alone(engine, "swap", "text", p)
    reached, release = step_gate(engine, at=4)

    async def run():
        s = make(engine)
        s.start()
        running = asyncio.ensure_future(ask(s, "swap", ["text"], p))
        await asyncio.to_thread(reached.wait, 20)
        engine.load(v2, version=2)  # mid-generation: the running request keeps v1's slot
        loaded_during = engine.registry.resident()
        release.set()
        first = await running
        second = await ask(s, "swap", ["text"], p)
        engine.registry.delete("swap")
        await s.drain_and_stop()
        return first, second, loaded_during

    first, second, loaded_during = asyncio.run(run())
    engine.load(v2, version=2)
    alone_v2 = alone(engine, "swap", "text", p)
    engine.registry.delete("swap")
    assert first == [before]
    assert loaded_during == 2  # v1 stayed resident while its row ran
    assert second == [alone_v2] and second != first
    with pytest.raises(UnknownTask):
        engine.registry.acquire(["swap"])
    assert engine.registry.resident() == 0


def test_a_timed_out_request_leaves_at_the_next_step_and_frees_its_lease(engine: Engine, tasks) -> None:
    async def run():
        s = make(engine, timeout_s=0.3)
        s.start()
        with pytest.raises(RequestTimeout):
            await ask(s, tasks[0], ["x"] * 8, GenerationParams(max_new_tokens=500, min_new_tokens=500, num_beams=4))
        for _ in range(100):
            if s.idle:
                break
            await asyncio.sleep(0.05)
        idle = s.idle
        quick = await ask(s, tasks[1], ["y"])
        await s.drain_and_stop()
        return idle, quick, s.metrics

    idle, quick, metrics = asyncio.run(run())
    assert idle, "the abandoned rows kept the engine busy"
    assert metrics.registry.get_sample_value("kronserve_cancelled_requests_total", {"stage": "running"}) == 1
    assert engine.registry._refs.total() == 0
    assert quick == [alone(engine, tasks[1], "y", GEN)]


def test_a_request_whose_caller_gave_up_while_queued_is_dropped_not_run(engine: Engine, tasks) -> None:
    reached, release = step_gate(engine, at=1)
    admitted: list[int] = []
    original = engine.prefill
    engine.prefill = lambda inputs, *a: (admitted.append(len(inputs)), original(inputs, *a))[1]  # type: ignore

    async def run():
        s = make(engine)
        s.start()
        first = asyncio.ensure_future(ask(s, tasks[0], ["a"]))
        await asyncio.to_thread(reached.wait, 20)
        abandoned = asyncio.ensure_future(ask(s, tasks[1], ["b", "c"]))
        kept = asyncio.ensure_future(ask(s, tasks[2], ["d"]))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned  # its job is marked cancelled before the loop goes on
        release.set()
        await asyncio.gather(first, kept)
        await s.drain_and_stop()
        return s.metrics

    metrics = asyncio.run(run())
    assert admitted == [1, 1]  # the first alone, then only the kept request: the abandoned rows never ran
    assert metrics.registry.get_sample_value("kronserve_cancelled_requests_total", {"stage": "queued"}) == 1
    assert engine.registry._refs.total() == 0


def test_a_sequence_whose_token_choice_fails_fails_alone(engine: Engine, tasks, monkeypatch) -> None:
    from kronserve.decoding import Sequence

    original = Sequence.choose

    def choose(self, logits):
        if self.params.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(self, logits)

    monkeypatch.setattr(Sequence, "choose", choose)
    bad = GenerationParams(max_new_tokens=6, temperature=1.0, seed=13)
    fine = GenerationParams(max_new_tokens=6)

    async def run():
        s = make(engine, wait_s=0.05)
        s.start()
        out = await asyncio.gather(
            ask(s, tasks[0], ["x", "y"], bad), *(ask(s, t, ["fine"], fine) for t in tasks[1:4]), return_exceptions=True
        )
        idle_after = s.idle
        await s.drain_and_stop()
        return out, idle_after

    (failed, *answered), _ = asyncio.run(run())
    assert isinstance(failed, RuntimeError)
    assert answered == [[alone(engine, t, "fine", fine)] for t in tasks[1:4]]
    assert engine.registry._refs.total() == 0


@pytest.mark.parametrize(
    "bound",
    [{"rows": 2}, {"cached_tokens": 60}, {"step_tokens": 20, "pass_tokens": 20}],
    ids=["max_batch_rows", "max_cached_tokens", "max_step_tokens"],
)
def test_admission_stops_at_each_bound(engine: Engine, tasks, bound: dict) -> None:
    """Three 2-row requests (each 2 × (9 input + 12 new) = 42 cached positions, 18 input tokens): under any one of
    the bounds one admission takes one request (the running bounds also keep the second out until the first leaves),
    and every request is still answered correctly (the step budget admits the next one at the next step)."""
    admitted: list[int] = []
    original = engine.prefill
    engine.prefill = lambda inputs, *a: (admitted.append(len(inputs)), original(inputs, *a))[1]  # type: ignore
    p = GenerationParams(max_new_tokens=12, min_new_tokens=12)

    async def run():
        s = make(engine, wait_s=0.05, **bound)
        s.start()
        out = await asyncio.gather(*(ask(s, tasks[i], ["12345678", "abcdefgh"], p) for i in range(3)))
        await s.drain_and_stop()
        return out, s.metrics

    out, metrics = asyncio.run(run())
    assert admitted == [2, 2, 2]  # one request per admission: the bound kept the others waiting
    if "step_tokens" not in bound:  # the running bounds: the second joins only once the first has left
        sample = metrics.registry.get_sample_value
        assert sample("kronserve_step_rows_sum") == 2 * sample("kronserve_step_rows_count")
    assert out == [[alone(engine, tasks[i], x, p) for x in ("12345678", "abcdefgh")] for i in range(3)]


def test_a_tiny_device_budget_serves_every_task_and_never_evicts_a_running_one(backbone, adapter_for) -> None:
    """Room for two adapters, eight tasks asked concurrently in mixed batches: every answer equals its run alone,
    nothing is refused, and a version stays on the device for as long as a row reads it."""
    size = adapter_for("probe", "compacter").spec.param_count(backbone.fingerprint.geometry) * 4
    engine = Engine(backbone, device_adapter_mb=2 * size / 2**20)
    names = [f"z{i}" for i in range(8)]
    for i, t in enumerate(names):
        engine.load(adapter_for(t, "compacter", seed=i, std=0.3))
    p = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    want = {t: alone(engine, t, "same input", p) for t in names}
    evicted_while_held = []
    original = engine.step

    def checked(batch):  # every slot a running row reads is resident, at every step
        evicted_while_held.extend(s for s in batch.slots if s >= 0 and not engine.device.has_slot(s))
        return original(batch)

    engine.step = checked  # type: ignore[method-assign]

    async def run():
        s = make(engine)
        s.start()
        got = await asyncio.gather(*(ask(s, names[i % 8], ["same input"], p) for i in range(32)))
        await s.drain_and_stop()
        return got

    got = asyncio.run(run())
    assert got == [[want[names[i % 8]]] for i in range(32)]
    assert evicted_while_held == []
    assert engine.device.used_bytes <= 2 * size and engine.device.budget >= engine.device.used_bytes
    assert engine.device.metrics.tier_evictions.labels("device")._value.get() > 0


def test_logprobs_of_a_mixed_batch_equal_one_teacher_forced_pass_alone(engine: Engine, tasks) -> None:
    """Each generated token's log-probability (greedy and sampled rows, several tasks, one batch) equals a plain
    teacher-forced pass over the same ids for that request alone (what /v1/score computes), its alternatives are
    the k best of that distribution, and asking for them changes no token."""
    greedy = GenerationParams(max_new_tokens=10, min_new_tokens=10, logprobs=3)
    sampled = GenerationParams(max_new_tokens=10, min_new_tokens=10, temperature=1.0, seed=3, logprobs=0)

    async def run():
        s = make(engine)
        s.start()
        tok = engine.tokenize
        jobs = []
        for task, params in ((tasks[0], greedy), (tasks[1], sampled), (tasks[2], greedy)):
            (entry,) = engine.registry.acquire([task])
            jobs.append(s.submit(entry, tok(["logprobs, please", "and for me"]), None, params))
        out = await asyncio.gather(*jobs)
        await s.drain_and_stop()
        return out

    results = asyncio.run(run())
    for task, outputs in zip(tasks[:3], results, strict=True):
        for text, output in zip(["logprobs, please", "and for me"], outputs, strict=True):
            assert len(output.logprobs) == len(output.ids) == 10
            with engine.resident([task]) as (_, slots):
                tf = teacher_forced(engine, slots, engine.tokenize([text])[0], output.ids)
            for t, (chosen, top) in enumerate(output.logprobs):
                assert chosen == pytest.approx(float(tf[t, output.ids[t]]), abs=2e-4)
                best = torch.topk(tf[t], len(top))
                assert [a for a, _ in top] == best.indices.tolist()
                assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=2e-4)
    assert [o.ids for o in results[0]] == alone_ids_all(engine, tasks[0], ["logprobs, please", "and for me"], 10)


def teacher_forced(engine: Engine, slots: list[int], inputs: list[int], ids: list[int]) -> torch.Tensor:
    """Log-softmax of the logits of one teacher-forced pass over `ids` [T, V] (the reference)."""
    enc = engine._padded([inputs])
    start = torch.tensor([[engine.vocab.start, *ids[:-1]]])
    with engine._routed_slots(slots):
        logits = engine.backbone.model(**enc, decoder_input_ids=start).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def alone_ids_all(engine: Engine, task: str, texts: list[str], n: int) -> list[list[int]]:
    p = GenerationParams(max_new_tokens=n, min_new_tokens=n)
    return [alone_ids(engine, task, text, p) for text in texts]
