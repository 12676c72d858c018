"""The step loop: one decode batch on the device, advanced one token per step, rows joining and leaving.

One thread owns the model. Each turn it
1. drops the rows of requests whose caller gave up (client gone, timeout) and frees their leases;
2. admits what `admission.schedule` decides: inputs of waiting predict requests within the capacity bounds
   and the step's encoder-token budget (a request may join over several steps), in one mixed-adapter
   encoder pass plus their first decoder step (their first tokens come out here);
3. runs one teacher-forced pass for waiting score requests, so scoring never waits for a generation;
4. advances every running row by one decoder step (rows of any task and any settings together), picks
   each sequence's token (`decoding.py`) and answers the requests whose sequences are all done.
A request leases its adapter version from acceptance until it leaves the loop, so a swap or delete in
the middle of its generation changes nothing for it; from admission it also holds the version on the
device, so its slot is neither evicted nor reused while a row reads it.

A failure is confined to the requests it concerns, and every other row continues bit-identically:
- an admission pass, or joining its rows to the batch, fails only the requests it was admitting;
- a decode step that raises is undone and tried again per adapter group on copies of the batch: the
  groups that still raise fail (their error names their task), the others step as if nothing happened;
- a row whose logits are not finite (an adapter that overflows) fails its request, never a 200 with "";
- a score pass fails only its own requests; a sequence whose next token cannot be chosen, its request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from .admission import REFERENCE_STEP_TOKENS, Budget, DeviceRoom, Load, schedule
from .batch import DecodeBatch, Member, spans
from .decoding import BeamSequence, Sequence, greedy_tokens, record_logprobs
from .engine import Engine
from .errors import KronserveError
from .jobs import Job
from .messages import Output, StreamedToken
from .metrics import Metrics
from .running import RunningBatch

log = logging.getLogger(__name__)
GATHER_ROUNDS, GATHER_SLICES = 10, 2


@dataclass(frozen=True)
class Bounds:
    rows: int  # running decoder rows (beams count one each)
    pass_tokens: int  # input tokens of one score pass
    cached_tokens: int  # running rows × (input + new tokens) the caches may reserve
    wait_s: float  # how long an idle loop waits for more requests before admitting
    step_tokens: int = REFERENCE_STEP_TOKENS  # encoder tokens admitted between two decode steps

    @property
    def budget(self) -> Budget:
        return Budget(self.rows, self.cached_tokens, self.pass_tokens, self.step_tokens)


class DecodeLoop:
    def __init__(self, engine: Engine, metrics: Metrics, bounds: Bounds) -> None:
        self.engine, self.metrics, self.bounds = engine, metrics, bounds
        self.device = engine.backbone.device
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._batch = DecodeBatch()
        self._stopping = False
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kronserve-engine", daemon=True)
        engine.owner, engine.post = self.run, self.post
        self.busy = False

    # ---- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def put(self, job: Job) -> None:
        with self._cv:
            self._waiting.append(job)
            self._cv.notify()

    def run(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the loop's thread between two steps and return its value (the engine's `owner`): the one
        writer of device memory. On the loop's own thread, or when no loop runs, it runs in place."""
        done: Future = Future()
        with self._cv:
            queued = threading.current_thread() is not self._thread and self._thread.is_alive() and not self._closed
            if queued:
                self._commands.append((work, done))
                self._cv.notify()
        return done.result() if queued else work()

    def post(self, work: Callable[[], Any]) -> None:
        """Like `run`, without waiting: for work whose caller need not know when it is done (a version leaving)."""
        with self._cv:
            queued = threading.current_thread() is not self._thread and self._thread.is_alive() and not self._closed
            if queued:
                self._commands.append((work, Future()))
                self._cv.notify()
        if not queued:
            work()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def waiting(self) -> int:
        """Requests not started yet (one admitted over several steps has started: it no longer counts)."""
        return sum(1 for job in list(self._waiting) if job.next_input == 0)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._batch and not self.busy

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.critical("the step loop died", exc_info=True)
            raise
        finally:  # whatever ended the loop: nobody waits on it forever
            self._fail_running(RuntimeError("the engine stopped"))
            with self._cv:
                self._closed = True  # later commands run in place
                waiting, self._waiting = list(self._waiting), deque()
            for job in waiting:
                self._finish_error(job, RuntimeError("the engine stopped"))
            self._run_commands()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._batch and not self._commands and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
            self._run_commands()
            if not self._waiting and not self._batch:
                continue
            if not self._batch:
                self._gather()
            self.busy = True
            try:
                self._turn()
            except Exception:  # a bug, not a request's fault: fail what runs, keep serving
                log.exception("decode loop turn failed")
                self._fail_running(RuntimeError("the engine failed while running this request"))
            finally:
                self.busy = False

    def _run_commands(self) -> None:
        while self._commands:
            with self._cv:
                work, done = self._commands.popleft()
            try:
                done.set_result(work())
            except BaseException as e:  # the caller raises it
                done.set_exception(e)

    def _gather(self) -> None:
        """An idle loop lets a burst gather before admitting it: it waits in slices of half of `wait_s` while each
        slice brings more requests, until they would fill the batch's rows, for at most `GATHER_ROUNDS` × `wait_s`.
        A burst (arrivals closer than a slice) becomes one admission pass; a steady stream with gaps, or a wave
        that fills the batch, does not keep the engine idle."""
        wait_s = self.bounds.wait_s
        deadline, seen = time.monotonic() + wait_s * GATHER_ROUNDS, -1
        while wait_s > 0 and (left := deadline - time.monotonic()) > 0 and len(self._waiting) != seen:
            seen = len(self._waiting)
            if sum(job.rows for job in list(self._waiting)) >= self.bounds.rows:
                return
            time.sleep(min(wait_s / GATHER_SLICES, left))

    def _turn(self) -> None:
        self._run_commands()
        self._drop_cancelled()
        self._end_stopped()
        admit, score = self._take()
        self._admit(admit)
        if score:
            self._score(score)
        if self._batch:
            self._step()
        self.metrics.queue_depth.set(self.waiting)

    def _take(self) -> tuple[list[tuple[Job, int, int]], list[Job]]:
        """This turn's (request, first input, count) admissions and score requests, taken off the queue."""
        room = DeviceRoom(*self.engine.device.leased())
        load = Load(self._batch.rows, self._batch.reserved)
        with self._cv:
            decided = schedule(list(self._waiting), load, self.bounds.budget, room, time.monotonic())
            running = {id(m.job) for m in self._batch.members}
            for job in decided.expired:
                self._waiting.remove(job)
                if job.failed:
                    continue  # answered (and released) already
                if id(job) in running:
                    job.cancelled = True  # its running rows leave at the next step, and release it then
                else:
                    self._drop(job, "queued" if job.next_input == 0 else "running")  # type: ignore[arg-type]
            admit: list[tuple[Job, int, int]] = []
            for job, count in decided.admit:
                admit.append((job, job.next_input, count))  # type: ignore[arg-type]
                job.next_input += count
                if job.next_input == len(job.inputs):
                    self._waiting.remove(job)
            advanced = {id(job) for job, _ in decided.admit}
            for job in self._waiting:
                job.stalled = job.next_input > 0 and id(job) not in advanced
            for job in decided.score:
                self._waiting.remove(job)
        return admit, decided.score  # type: ignore[return-value]

    # ---- admission -----------------------------------------------------------------------------
    def _admit(self, admit: list[tuple[Job, int, int]]) -> None:
        self.metrics.step_admissions.observe(len(admit))
        if not admit:
            return
        jobs = [job for job, _, _ in admit]
        started = time.perf_counter()
        try:
            admitted = [(job, i) for job, first, n in admit for i in range(first, first + n)]
            groups = [self._members(job, i) for job, i in admitted]  # an input's n sequences share its encoder row
            members = [m for group in groups for m in group]
            inputs = [job.inputs[i] for job, i in admitted]
            self._observe_pass(jobs, [job for job, first, _ in admit if first == 0], inputs, started)
            self._hold(jobs)
            slots = [job.slot for job, _ in admitted]
            rows = [sum(m.seq.rows for m in group) for group in groups]
            pre = self.engine.prefill(inputs, slots, rows)  # type: ignore[arg-type]
            pre.batch.next_tokens = self._choose(pre.logits, members, pre.batch)
            self._batch.join(pre.batch, members)
        except Exception as e:  # the joiners alone: the running rows are as they were
            log.error("admitting %d requests failed: %s", len(jobs), e)
            for job in jobs:
                self._fail_job(job, e)
            self._leave()  # rows that joined in earlier steps leave with their request
            return
        now = time.perf_counter()
        self.metrics.engine_time.labels("generate").observe(now - started)
        for job, first, _ in admit:
            if first == 0:
                self.metrics.time_to_first_token.observe(now - job.accepted)
        self._publish(members)
        self._leave()

    def _members(self, job: Job, index: int) -> list[Member]:
        """Input `index`'s sequences: one beam search, or `n` one-row sequences sampled apart."""
        assert job.params is not None
        p, vocab = job.params, self.engine.vocab
        if p.num_beams > 1:
            return [Member(job, index, BeamSequence(p, vocab), job.reserved_by(index), index)]
        share = job.reserved_by(index) // p.n
        return [Member(job, index, Sequence(p, vocab, self.device, j), share, index * p.n + j) for j in range(p.n)]

    # ---- a decode step ---------------------------------------------------------------------------
    def _step(self) -> None:
        batch = self._batch
        assert batch.tensors is not None
        started = time.perf_counter()
        self.metrics.step_rows.observe(batch.rows)
        self.metrics.step_tasks.observe(len({m.job.entry.task for m in batch.members}))
        logits = self._forward(batch)
        if logits is None:
            return
        assert batch.tensors is not None
        batch.tensors.next_tokens = self._choose(logits, batch.members, batch.tensors)
        self._publish(batch.members)
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.observe(elapsed)
        for _ in {id(m.job) for m in batch.members}:
            self.metrics.inter_token.observe(elapsed)
        self._leave()

    def _forward(self, batch: DecodeBatch) -> torch.Tensor | None:
        """One decoder step's logits [R, V]; if it raises, the adapter groups that still raise alone fail and the
        step runs again without them (None when no row is left)."""
        assert batch.tensors is not None
        try:
            return self.engine.step(batch.tensors)
        except Exception as e:
            batch.tensors.undo_partial_step()
            error = e
        culprits = self._culprits(batch)
        if not culprits:  # nothing fails alone: the step itself is broken
            raise error
        for m in batch.members:
            if m.job.slot in culprits:
                task = m.job.entry.task
                self._fail_job(
                    m.job,
                    KronserveError(f"the adapter of task {task!r} failed in a decode step: {culprits[m.job.slot]}"),
                )
        self._leave()
        return self._forward(batch) if batch else None

    def _culprits(self, batch: DecodeBatch) -> dict[int | None, str]:
        """Each adapter group (device slot) whose rows alone still fail a step, with its error (on copies)."""
        found: dict[int | None, str] = {}
        for slot in {m.job.slot for m in batch.members}:
            try:
                self.engine.step(batch.probe(lambda m, s=slot: m.job.slot == s))
            except Exception as e:
                log.error("adapter in device slot %s fails a decode step: %s", slot, e)
                found[slot] = f"{type(e).__name__}: {e}"
        return found

    def _choose(self, logits: torch.Tensor, members: list[Member], batch: RunningBatch) -> torch.Tensor:
        """Every member's next tokens [R] (device); beam members also reorder their rows' caches."""
        tokens: list[int] = [0] * batch.rows
        order = list(range(batch.rows))
        greedy: list[tuple[int, Sequence]] = []
        finite = torch.isfinite(logits).all(-1).tolist()
        for row, m in spans(members):
            seq = m.seq
            if m.job.failed:
                continue
            if not all(finite[row : row + seq.rows]):
                self._fail_job(
                    m.job,
                    KronserveError(
                        f"the adapter of task {m.job.entry.task!r} produced non-finite values (NaN or inf) in its "
                        "logits"
                    ),
                )
            elif isinstance(seq, Sequence) and not seq.params.sampling:
                greedy.append((row, seq))
            else:
                try:
                    choice = seq.choose(logits[row : row + seq.rows].clone())
                except Exception as e:  # this sequence's request alone fails; its rows leave below
                    log.error("request for task %r: choosing its next token failed: %s", m.job.entry.task, e)
                    self._fail_job(m.job, e)
                else:
                    tokens[row : row + seq.rows] = choice.tokens
                    if choice.order is not None:
                        order[row : row + seq.rows] = [row + i for i in choice.order]
        if greedy:
            rows = [r for r, _ in greedy]
            picked = greedy_tokens(logits[rows], [s for _, s in greedy])
            for (r, seq), token in zip(greedy, picked, strict=True):
                seq.take(token)
                tokens[r] = token
        self._logprobs(logits, members, tokens)
        if order != list(range(batch.rows)):
            batch.reorder(order)
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    @staticmethod
    def _logprobs(logits: torch.Tensor, members: list[Member], tokens: list[int]) -> None:
        """The log-probabilities of this step's tokens, for the sequences whose request asked (raw logits)."""
        wanted = [
            (row, m.seq)
            for row, m in spans(members)
            if isinstance(m.seq, Sequence) and m.seq.logprobs is not None and not m.job.failed
        ]
        if wanted:
            rows = [r for r, _ in wanted]
            record_logprobs(logits[rows], [tokens[r] for r in rows], [s for _, s in wanted])

    @staticmethod
    def _publish(members: list[Member]) -> None:
        """Each streamed one-row sequence's new token, handed over once per request (beams have no token to stream
        until they end)."""
        step: dict[int, tuple[Job, list[StreamedToken]]] = {}
        for m in members:
            seq = m.seq
            if m.job.stream is not None and isinstance(seq, Sequence) and seq.tokens and not m.job.failed:
                pair = (
                    (m.output, seq.tokens[-1])
                    if seq.logprobs is None
                    else (m.output, seq.tokens[-1], *seq.logprobs[-1])
                )
                step.setdefault(id(m.job), (m.job, []))[1].append(pair)
        for job, pairs in step.values():
            job.streamed(pairs)

    def _leave(self) -> None:
        """Answer the requests whose sequences are all done; their rows (and failed requests' rows) leave."""
        for m in self._batch.keep(lambda m: not m.job.failed and not m.seq.done):
            if not m.job.failed:
                self._sequence_done(m)

    def _sequence_done(self, m: Member) -> None:
        job = m.job
        job.outputs[m.output] = m.seq.output()
        job.logprobs[m.output] = getattr(m.seq, "logprobs", None)
        if all(o is not None for o in job.outputs):
            self._answer(job, [o for o in job.outputs if o is not None])

    def _answer(self, job: Job, ids: list[list[int]]) -> None:
        """Token ids out (the text side decodes them)."""
        eos = self.engine.vocab.eos
        prompts = [prompt for prompt in job.inputs for _ in range(job.per_input)]
        answers = [
            Output(row, len(prompt), "stop" if row[-1:] == [eos] else "length", logprobs)
            for row, prompt, logprobs in zip(ids, prompts, job.logprobs, strict=True)
        ]
        self.metrics.generated_tokens.inc(sum(len(row) for row in ids))
        self._finish(job, answers)

    # ---- cancellation and failure ------------------------------------------------------------------
    def _end_stopped(self) -> None:
        """Sequences whose stream saw a stop string end now, with the tokens they have."""
        stopped = [m for m in self._batch.members if m.job.stream is not None and m.output in m.job.stream.stopped]
        for m in stopped:
            m.seq.done = True
        if stopped:
            self._leave()

    def _drop_cancelled(self) -> None:
        if not any(m.job.cancelled for m in self._batch.members):
            return
        gone = self._batch.keep(lambda m: not m.job.cancelled)
        for job in {id(m.job): m.job for m in gone}.values():
            self._drop(job, "running")

    def _drop(self, job: Job, stage: str) -> None:
        self.metrics.cancelled.labels(stage).inc()
        self._release(job)

    def _fail_job(self, job: Job, error: Exception) -> None:
        job.failed = True
        self._finish_error(job, error)

    def _fail_running(self, error: Exception) -> None:
        members, self._batch = self._batch.members, DecodeBatch()
        for job in {id(m.job): m.job for m in members}.values():
            self._fail_job(job, error)

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

    # ---- score passes ----------------------------------------------------------------------------
    def _score(self, jobs: list[Job]) -> None:
        targets = [ids for j in jobs for ids in (j.targets or [])]
        self._whole_pass(
            jobs, "score", lambda slots, inputs: self.engine.score_ids(slots, inputs, targets), self._finish
        )

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
        self._observe_pass(jobs, jobs, [ids for j in jobs for ids in j.inputs], started)
        try:
            self._hold(jobs)
            values = compute([j.slot for j in jobs for _ in j.inputs], [ids for j in jobs for ids in j.inputs])  # type: ignore[misc]
        except Exception as e:
            for job in jobs:
                self._finish_error(job, e)
            return
        self.metrics.engine_time.labels(kind).observe(time.perf_counter() - started)
        start = 0
        for job in jobs:
            deliver(job, values[start : start + len(job.inputs)])
            start += len(job.inputs)

    def _observe_pass(self, jobs: list[Job], first: list[Job], inputs: list[list[int]], started: float) -> None:
        """One pass encoding `inputs` of `jobs`; it starts `first` (their queue wait ends here)."""
        for job in first:
            self.metrics.queue_wait.observe(started - job.accepted)
        self.metrics.input_tokens.inc(sum(map(len, inputs)))
        self.metrics.batch_rows.observe(len(inputs))
        self.metrics.batch_tasks.observe(len({j.entry.task for j in jobs}))
