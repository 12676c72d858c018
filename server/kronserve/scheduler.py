"""Dynamic batching across tasks: concurrent requests of any tasks merge into one engine batch.

The LitServe loop shape: a request is validated and tokenized-counted *before* it joins the queue
(one bad request never fails a batch); the batcher takes the oldest request, adds every queued
request with the same generation settings until the row or token bound, waiting at most
`batch_wait_ms` to fill; the engine runs the batch on its own thread (off the event loop); each
request's future gets its own rows back. Each request holds a lease on its task's version from
admission (the caller acquires it), so a swap or delete while it queues cannot change its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine
from .errors import NotReady, Overloaded, RequestTimeout
from .metrics import Metrics
from .registry import Entry


@dataclass(frozen=True)
class BatchKey:
    """Requests batch together only when one engine call can serve them all."""

    kind: str  # "generate" | "score"
    max_new_tokens: int = 0
    num_beams: int = 1
    min_new_tokens: int = 0


@dataclass
class Job:
    key: BatchKey
    entry: Entry  # leased by the caller at admission: the version this request is answered with
    inputs: list[str]
    targets: list[str] | None
    tokens: int
    deadline: float
    future: asyncio.Future[Any]
    admitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Result:
    task: str
    version: int
    values: list[Any]  # output strings or float scores
    replica: str | None = None  # which cluster replica answered (None: the single-process server)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        max_rows: int,
        max_tokens: int,
        wait_ms: float,
        queue_size: int,
        timeout_s: float,
        fill_fraction: float = 0.25,
    ) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_rows, self.max_tokens, self.wait_s = max_rows, max_tokens, wait_ms / 1000
        self.queue_size, self.timeout_s, self.fill_fraction = queue_size, timeout_s, fill_fraction
        self._last_rows, self._last_engine_s, self._last_end = 0, 0.0, float("-inf")
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kronserve-engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        self._in_flight = 0

    @property
    def idle(self) -> bool:
        """No request queued or in the engine (read from other threads: plain reads, no lock needed)."""
        return not self._queue and self._in_flight == 0

    def start(self) -> None:
        self._accepting = True
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain_and_stop(self) -> None:
        """Refuse new work, finish everything already accepted, then stop the batcher."""
        self._accepting = False
        while self._queue or self._in_flight:
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=True)

    async def submit(
        self, key: BatchKey, entry: Entry, inputs: list[str], targets: list[str] | None, tokens: int
    ) -> Result:
        """Queue one validated request and wait for its rows; raises Overloaded when the queue is full.

        `entry` is leased by the caller (see `Registry.acquire`) for as long as this call runs.
        """
        if not self._accepting:
            raise NotReady("the server is not accepting requests (starting or shutting down)", retry_after=5)
        if len(self._queue) >= self.queue_size:
            raise Overloaded(f"request queue is full ({self.queue_size} waiting); retry shortly", retry_after=1)
        job = Job(
            key,
            entry,
            inputs,
            targets,
            tokens,
            time.monotonic() + self.timeout_s,
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=self.timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise RequestTimeout(f"request did not finish within {self.timeout_s:g} s", retry_after=1) from None
        except asyncio.CancelledError:
            # The caller gave up (a client left, or the cluster gateway re-sent the request elsewhere): a queued
            # job is dropped, not run; rows of a batch already running are discarded when it ends.
            job.future.cancel()
            raise

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._in_flight += 1  # a batch being collected counts as in flight (see `idle`)
            try:
                batch = await self._collect()
                if batch:
                    await self._execute(batch)
            finally:
                self._in_flight -= 1

    async def _collect(self) -> list[Job]:
        """Oldest request's key decides the batch; fill it from the queue until full or the wait ends."""
        self._drop_expired()
        if not self._queue:
            return []
        key = self._queue[0].key
        target, wait = self._fill_goal()
        deadline = time.monotonic() + wait
        batch: list[Job] = []
        rows = tokens = 0
        while True:
            for job in list(self._queue):
                if job.key != key:
                    continue
                fits = rows + len(job.inputs) <= self.max_rows and tokens + job.tokens <= self.max_tokens
                if batch and not fits:
                    continue
                self._queue.remove(job)
                batch.append(job)
                rows, tokens = rows + len(job.inputs), tokens + job.tokens
            remaining = deadline - time.monotonic()
            if rows >= target or tokens >= self.max_tokens or remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
        self.metrics.queue_depth.set(len(self._queue))
        return [j for j in batch if not j.future.done()]

    def _fill_goal(self) -> tuple[int, float]:
        """(rows to aim for, how long to wait for them).

        Idle server: a full batch, waiting `batch_wait_ms`. Saturated server (the last batch just ended):
        the clients it answered are sending their next requests through HTTP right now, so wait up to
        `fill_fraction` of the last batch's engine time for as many rows as it had; without this a closed
        loop of clients settles into alternating tiny and full batches.
        """
        saturated = time.monotonic() - self._last_end < max(self.wait_s, 0.001)
        if not saturated or self.fill_fraction <= 0:
            return self.max_rows, self.wait_s
        target = min(self.max_rows, max(self._last_rows, 1))
        return target, max(self.wait_s, self.fill_fraction * self._last_engine_s)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now or j.future.done()]:
            self._queue.remove(job)

    async def _execute(self, batch: list[Job]) -> None:
        try:
            started = time.perf_counter()
            for job in batch:
                self.metrics.queue_wait.observe(started - job.admitted)
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._executor, self._run_batch, batch)
            elapsed = time.perf_counter() - started
            self.metrics.engine_time.labels(batch[0].key.kind).observe(elapsed)
            self._last_rows, self._last_engine_s = sum(len(j.inputs) for j in batch), elapsed
            self._last_end = time.monotonic()
            for job, result in zip(batch, outcome, strict=True):
                if job.future.done():
                    continue
                job.future.set_result(result)
        except BaseException as e:  # the engine failed as a whole: every request of the batch learns why
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            if not isinstance(e, Exception):
                raise

    def _run_batch(self, batch: list[Job]) -> list[Result]:
        """On the engine thread: every job's entry is already leased, so the batch cannot lose a task."""
        row_entries = [j.entry for j in batch for _ in j.inputs]
        inputs = [x for j in batch for x in j.inputs]
        self.metrics.batch_rows.observe(len(inputs))
        self.metrics.batch_tasks.observe(len({j.entry.task for j in batch}))
        values = self._engine_call(batch[0].key, row_entries, inputs, batch)
        results, start = [], 0
        for j in batch:
            results.append(Result(j.entry.task, j.entry.version, values[start : start + len(j.inputs)]))
            start += len(j.inputs)
        return results

    def _engine_call(self, key: BatchKey, entries: list[Entry], inputs: list[str], batch: list[Job]) -> list[Any]:
        if key.kind == "score":
            targets = [t for j in batch for t in j.targets or []]
            return self.engine.score_leased(entries, inputs, targets).scores
        return self.engine.generate_leased(
            entries, inputs, key.max_new_tokens, key.num_beams, key.min_new_tokens
        ).outputs
