"""The step loop: one running batch on the device, advanced one token per step, rows joining and leaving.

One thread owns the model. Each turn it
1. drops the rows of requests whose caller gave up (client gone, timeout) and frees their leases;
2. admits waiting predict requests while the batch's row and cached-token bounds allow (one mixed-adapter
   encoder pass plus their first decoder step; their first tokens come out here);
3. runs one teacher-forced pass for waiting score requests, so scoring never waits for a generation;
4. advances every running row by one decoder step (rows of any task and any settings together), picks
   each sequence's token (`decoding.py`) and answers the requests whose sequences are all done.
A request leases its adapter version from acceptance until it leaves the loop, so a swap or delete in
the middle of its generation changes nothing for it; from admission it also holds the version on the
device, so its slot is neither evicted nor reused while a row reads it. Admission bounds the distinct
adapters the running rows hold by the device budget, so a batch never needs more than the tier holds.
A failure is confined to the requests it concerns: an admission or a score pass fails only its own
requests, a sequence whose next token cannot be chosen fails only its request.

`static` mode is the engine before this loop (one HF `generate()` per batch of identical settings, no
joining): kept as the baseline `benchmarks/continuous.py` measures against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .decoding import BeamSequence, Sequence, greedy_tokens
from .engine import Engine
from .errors import InvalidRequest, KronserveError
from .jobs import Job, TokenStream
from .messages import Output
from .metrics import Metrics
from .running import RunningBatch

log = logging.getLogger(__name__)
GATHER_ROUNDS = 10


@dataclass(frozen=True)
class Bounds:
    rows: int  # running decoder rows (beams count one each)
    pass_tokens: int  # input tokens of one admission or score pass
    cached_tokens: int  # running rows × (input + new tokens) the caches may reserve
    wait_s: float  # how long an idle loop waits for more requests before admitting


class _DeviceRoom:
    """The device budget during one `_take`: versions already held cost nothing more, a new one its bytes."""

    def __init__(self, held: set, held_bytes: int, budget: int) -> None:
        self.held, self.bytes, self.budget = set(held), held_bytes, budget

    def cost(self, job: Job) -> int:
        return 0 if job.entry.key in self.held else job.packed.nbytes

    def fits(self, job: Job) -> bool:
        return self.bytes + self.cost(job) <= self.budget

    def take(self, job: Job) -> None:
        self.bytes += self.cost(job)
        self.held.add(job.entry.key)


@dataclass
class _Member:
    """One input of one admitted request: its sequence and where its answer goes."""

    job: Job
    index: int
    seq: Sequence | BeamSequence
    reserved: int  # cached tokens it reserves (rows × (input + max new tokens))


@dataclass
class _Running:
    batch: RunningBatch | None = None
    members: list[_Member] = field(default_factory=list)  # in row order; each spans `seq.rows` rows

    @property
    def rows(self) -> int:
        return self.batch.rows if self.batch is not None else 0

    @property
    def reserved(self) -> int:
        return sum(m.reserved for m in self.members)


class DecodeLoop:
    def __init__(self, engine: Engine, metrics: Metrics, bounds: Bounds, static: bool = False) -> None:
        self.engine, self.metrics, self.bounds, self.static = engine, metrics, bounds, static
        self.device = engine.backbone.device
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running = _Running()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kronserve-engine", daemon=True)
        self._outputs: dict[int, list[list[int] | None]] = {}  # id(job) -> each input's tokens once done
        self.busy = False

    # ---- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def put(self, job: Job) -> None:
        with self._cv:
            self._waiting.append(job)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running.members and not self.busy

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running.members and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                idle = not self._running.members
            if idle:
                self._gather()
            self.busy = True
            try:
                self._turn()
            except Exception:  # a bug, not a request's fault: fail what runs, keep serving
                log.exception("decode loop turn failed")
                self._fail_running(RuntimeError("the engine failed while running this request"))
            finally:
                self.busy = False
        self._fail_running(RuntimeError("the engine stopped"))

    def _gather(self) -> None:
        """An idle loop lets a burst gather before admitting it: it waits `wait_s` and then again while requests
        keep arriving, for at most `GATHER_ROUNDS` waits, so a burst sent at once is one admission pass."""
        seen = -1
        for _ in range(GATHER_ROUNDS):
            if self.bounds.wait_s <= 0 or len(self._waiting) == seen:
                return
            seen = len(self._waiting)
            time.sleep(self.bounds.wait_s)

    def _turn(self) -> None:
        self._drop_cancelled()
        self._end_stopped()
        generate, score = self._take()
        if self.static:
            self._run_static(generate)
        else:
            self._admit(generate)
        if score:
            self._score(score)
        if self._running.members:
            self._step()
        self.metrics.queue_depth.set(len(self._waiting))

    def _take(self) -> tuple[list[Job], list[Job]]:
        """Waiting jobs this turn serves: predict jobs FIFO while the bounds allow, one bounded score pass."""
        b, now = self.bounds, time.monotonic()
        rows, reserved, tokens = self._running.rows, self._running.reserved, 0
        generate: list[Job] = []
        score: list[Job] = []
        score_rows = score_tokens = 0
        blocked = self.static and bool(self._running.members)
        room = _DeviceRoom(*self.engine.device.leased())
        with self._cv:
            for job in list(self._waiting):
                if job.cancelled or job.deadline <= now:
                    self._waiting.remove(job)
                    self._drop(job, "queued")
                    continue
                if job.params is None:  # a score request
                    first = not score
                    fits = score_rows + job.rows <= b.rows and score_tokens + job.tokens <= b.pass_tokens
                    if first or (fits and room.fits(job)):
                        self._waiting.remove(job)
                        room.take(job)
                        score.append(job)
                        score_rows, score_tokens = score_rows + job.rows, score_tokens + job.tokens
                    continue
                if blocked:
                    continue
                if self.static and generate and job.params != generate[0].params:
                    continue
                empty = rows == 0
                fits = rows + job.rows <= b.rows and reserved + job.reserved <= b.cached_tokens
                fits = fits and tokens + job.tokens <= b.pass_tokens and room.fits(job)
                if not (empty or fits):
                    blocked = not self.static  # strict FIFO for predict jobs: a big request is not starved
                    continue
                self._waiting.remove(job)
                room.take(job)
                generate.append(job)
                rows, reserved, tokens = rows + job.rows, reserved + job.reserved, tokens + job.tokens
        return generate, score

    # ---- admission -----------------------------------------------------------------------------
    def _admit(self, jobs: list[Job]) -> None:
        self.metrics.step_admissions.observe(len(jobs))
        if not jobs:
            return
        started = time.perf_counter()
        self._observe_pass(jobs, started)
        try:
            self._hold(jobs)
            inputs = [ids for j in jobs for ids in j.inputs]
            slots = [j.slot for j in jobs for _ in j.inputs]
            members = [self._member(j, i) for j in jobs for i in range(len(j.inputs))]
            pre = self.engine.prefill(inputs, slots, [m.seq.rows for m in members])
            next_tokens = self._choose(pre.logits, members, pre.batch)
        except Exception as e:
            for job in jobs:
                self._finish_error(job, e)
            return
        now = time.perf_counter()
        self.metrics.engine_time.labels("generate").observe(now - started)
        for job in jobs:
            self.metrics.time_to_first_token.observe(now - job.admitted)
        pre.batch.next_tokens = next_tokens
        self._publish(members)
        self._merge(pre.batch, members)

    def _member(self, job: Job, index: int) -> _Member:
        assert job.params is not None
        p = job.params
        seq = BeamSequence(p, self.engine.vocab) if p.num_beams > 1 else Sequence(p, self.engine.vocab, self.device)
        return _Member(job, index, seq, job.reserved_by(index))

    def _merge(self, batch: RunningBatch, members: list[_Member]) -> None:
        running = self._running
        if running.batch is None:
            running.batch, running.members = batch, members
        else:
            running.batch.concatenate(batch)
            running.members = running.members + members
        self._leave()

    # ---- a decode step ---------------------------------------------------------------------------
    def _step(self) -> None:
        running = self._running
        assert running.batch is not None
        started = time.perf_counter()
        self.metrics.step_rows.observe(running.rows)
        self.metrics.step_tasks.observe(len({m.job.entry.task for m in running.members}))
        logits = self.engine.step(running.batch)
        running.batch.next_tokens = self._choose(logits, running.members, running.batch)
        self._publish(running.members)
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.observe(elapsed)
        for _ in {id(m.job) for m in running.members}:
            self.metrics.inter_token.observe(elapsed)
        self._leave()

    def _choose(self, logits: torch.Tensor, members: list[_Member], batch: RunningBatch) -> torch.Tensor:
        """Every member's next tokens [R] (device); beam members also reorder their rows' caches."""
        tokens: list[int] = [0] * batch.rows
        order = list(range(batch.rows))
        greedy: list[tuple[int, Sequence]] = []
        row = 0
        for m in members:
            seq = m.seq
            if isinstance(seq, Sequence) and not seq.params.sampling:
                greedy.append((row, seq))
            elif not m.job.failed:
                try:
                    choice = seq.choose(logits[row : row + seq.rows].clone())
                except Exception as e:  # this sequence's request alone fails; its rows leave below
                    log.error("request for task %r: choosing its next token failed: %s", m.job.entry.task, e)
                    self._fail_job(m.job, e)
                else:
                    tokens[row : row + seq.rows] = choice.tokens
                    if choice.order is not None:
                        order[row : row + seq.rows] = [row + i for i in choice.order]
            row += seq.rows
        if greedy:
            rows = [r for r, _ in greedy]
            picked = greedy_tokens(logits[rows], [s for _, s in greedy])
            for (r, seq), token in zip(greedy, picked, strict=True):
                seq.take(token)
                tokens[r] = token
        if order != list(range(batch.rows)):
            batch.reorder(order)
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    @staticmethod
    def _publish(members: list[_Member]) -> None:
        """Each streamed one-row sequence's new token, handed over once per request (beams have no token to stream
        until they end)."""
        step: dict[int, tuple[TokenStream, list[tuple[int, int]]]] = {}
        for m in members:
            if m.job.stream is not None and isinstance(m.seq, Sequence) and m.seq.tokens and not m.job.failed:
                step.setdefault(id(m.job), (m.job.stream, []))[1].append((m.index, m.seq.tokens[-1]))
        for stream, pairs in step.values():
            stream.push(pairs)

    def _leave(self) -> None:
        """Answer the requests whose sequences are all done; their rows leave the batch."""
        running = self._running
        keep_rows: list[int] = []
        kept: list[_Member] = []
        row = 0
        for m in running.members:
            if m.job.failed:
                pass  # answered with its error already
            elif m.seq.done:
                self._sequence_done(m)
            else:
                keep_rows.extend(range(row, row + m.seq.rows))
                kept.append(m)
            row += m.seq.rows
        self._shrink(keep_rows, kept)

    def _shrink(self, keep_rows: list[int], kept: list[_Member]) -> None:
        running = self._running
        if not kept:
            running.batch, running.members = None, []
        elif len(kept) != len(running.members):
            assert running.batch is not None
            running.batch.filter(keep_rows)
            running.members = kept

    def _sequence_done(self, m: _Member) -> None:
        outputs = self._outputs.setdefault(id(m.job), [None] * len(m.job.inputs))
        outputs[m.index] = m.seq.output()
        if all(o is not None for o in outputs):
            del self._outputs[id(m.job)]
            self._answer(m.job, [o for o in outputs if o is not None])

    def _answer(self, job: Job, ids: list[list[int]]) -> None:
        """Token ids out (the text side decodes them)."""
        eos = self.engine.vocab.eos
        answers = [
            Output(row, len(prompt), "stop" if row[-1:] == [eos] else "length")
            for row, prompt in zip(ids, job.inputs, strict=True)
        ]
        self.metrics.generated_tokens.inc(sum(len(row) for row in ids))
        self._finish(job, answers)

    # ---- cancellation and failure ------------------------------------------------------------------
    def _end_stopped(self) -> None:
        """Sequences whose stream saw a stop string end now, with the tokens they have."""
        stopped = [m for m in self._running.members if m.job.stream is not None and m.index in m.job.stream.stopped]
        for m in stopped:
            m.seq.done = True
        if stopped:
            self._leave()

    def _drop_cancelled(self) -> None:
        running = self._running
        if not any(m.job.cancelled for m in running.members):
            return
        keep_rows: list[int] = []
        kept: list[_Member] = []
        dropped: dict[int, Job] = {}
        row = 0
        for m in running.members:
            if m.job.cancelled:
                dropped[id(m.job)] = m.job
            else:
                keep_rows.extend(range(row, row + m.seq.rows))
                kept.append(m)
            row += m.seq.rows
        self._shrink(keep_rows, kept)
        for job in dropped.values():
            self._outputs.pop(id(job), None)
            self._drop(job, "running")

    def _drop(self, job: Job, stage: str) -> None:
        self.metrics.cancelled.labels(stage).inc()
        self._release(job)

    def _fail_job(self, job: Job, error: Exception) -> None:
        job.failed = True
        self._outputs.pop(id(job), None)
        self._finish_error(job, error)

    def _fail_running(self, error: Exception) -> None:
        members, self._running = self._running.members, _Running()
        for job in {id(m.job): m.job for m in members}.values():
            self._outputs.pop(id(job), None)
            self._finish_error(job, error)

    def _finish(self, job: Job, values: list) -> None:
        self._release(job)
        job.resolve(values)

    def _finish_error(self, job: Job, error: Exception) -> None:
        self._release(job)
        job.reject(error if isinstance(error, KronserveError) else RuntimeError(str(error)))

    def _release(self, job: Job) -> None:
        if job.take_lease():
            if job.slot is not None:
                self.engine.release([job.slot])
            self.engine.registry.release([job.entry])

    def _hold(self, jobs: list[Job]) -> None:
        """Give each job its device slot (a miss copies its packed weights to the device)."""
        wanted = [j for j in jobs if j.slot is None]
        if wanted:
            slots = self.engine.hold([j.entry for j in wanted], [j.packed for j in wanted])
            for job, slot in zip(wanted, slots, strict=True):
                job.slot = slot

    # ---- score passes and the static baseline -----------------------------------------------------
    def _score(self, jobs: list[Job]) -> None:
        targets = [ids for j in jobs for ids in (j.targets or [])]
        self._whole_pass(
            jobs, "score", lambda slots, inputs: self.engine.score_ids(slots, inputs, targets), self._finish
        )

    def _run_static(self, jobs: list[Job]) -> None:
        """The baseline: the whole batch in one HF `generate()`; nothing joins until it ends."""
        if not jobs:
            return
        p = jobs[0].params
        assert p is not None

        def generate(slots: list[int], inputs: list[list[int]]) -> list[list[int]]:
            if p.sampling:
                raise InvalidRequest("sampling (temperature > 0) needs KRONSERVE_BATCHING=continuous")
            return self.engine.generate_ids(slots, inputs, p.max_new_tokens, p.num_beams, p.min_new_tokens)

        self._whole_pass(jobs, "generate", generate, self._answer)

    def _whole_pass(
        self,
        jobs: list[Job],
        kind: str,
        compute: Callable[[list[int], list[list[int]]], list[Any]],
        deliver: Callable[[Job, list[Any]], None],
    ) -> None:
        """One forward computation over every input of `jobs` (slots, token ids -> a value per input); each job
        gets its own values, or, if the pass fails, the error."""
        started = time.perf_counter()
        self._observe_pass(jobs, started)
        try:
            self._hold(jobs)
            values = compute([j.slot for j in jobs for _ in j.inputs], [ids for j in jobs for ids in j.inputs])
        except Exception as e:
            for job in jobs:
                self._finish_error(job, e)
            return
        self.metrics.engine_time.labels(kind).observe(time.perf_counter() - started)
        start = 0
        for job in jobs:
            deliver(job, values[start : start + len(job.inputs)])
            start += len(job.inputs)

    def _observe_pass(self, jobs: list[Job], started: float) -> None:
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.admitted)
        self.metrics.input_tokens.inc(sum(len(ids) for j in jobs for ids in j.inputs))
        self.metrics.batch_rows.observe(sum(len(j.inputs) for j in jobs))
        self.metrics.batch_tasks.observe(len({j.entry.task for j in jobs}))
