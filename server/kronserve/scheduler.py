"""The event loop's side of the engine: accept, queue with backpressure, wait, cancel.

A request is validated and tokenized before it gets here (one bad request never fails a batch) and
arrives with its adapter version leased; `submit` fetches the version's weights into the host tier (a
cold task's first request reads the store here, off the event loop) and hands it to the `DecodeLoop`
thread, which admits it at its next step; the queue is bounded (503 + Retry-After when full), and a
caller that gives up (client gone, timeout, a cluster re-send) marks its job cancelled: the loop drops
its rows at the next step and releases the lease then, never while a row still reads the slot.
"""

from __future__ import annotations

import asyncio
import time

from .compact import Compact
from .engine import Engine
from .errors import KronserveError, NotReady, Overloaded, RequestTimeout
from .jobs import Job, TokenStream
from .loop import Bounds, DecodeLoop
from .messages import GenerationParams
from .metrics import Metrics
from .registry import Entry
from .static_loop import StaticLoop


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        bounds: Bounds,
        queue_size: int,
        timeout_s: float,
        static: bool = False,
    ) -> None:
        self.engine, self.metrics = engine, metrics
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self.loop = (StaticLoop if static else DecodeLoop)(engine, metrics, bounds)
        self._accepting = False

    @property
    def idle(self) -> bool:
        """No request queued or running (read from other threads)."""
        return self.loop.idle

    def start(self) -> None:
        self._accepting = True
        self.loop.start()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain_and_stop(self) -> None:
        """Refuse new work, finish everything already accepted, then stop the loop."""
        self._accepting = False
        while not self.loop.idle:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.loop.stop)

    async def accept(
        self,
        entry: Entry,
        inputs: list[list[int]],
        targets: list[list[int]] | None = None,
        params: GenerationParams | None = None,
        stream: TokenStream | None = None,
    ) -> Job:
        """Queue one request (predict when `params`, else score); raises, before anything is queued, what refuses it
        (not accepting, queue full, the adapter's weights unreadable). `wait` then gives its values.

        Takes over the caller's lease on `entry`: it is released when the request leaves the engine, or here if
        it is refused. With `stream`, the engine also pushes each input's tokens as it picks them.
        """
        refused = self.refusal()
        if refused is not None:
            self.engine.registry.release([entry])
            raise refused
        try:
            packed = await self._fetch(entry)
        except BaseException:
            self.engine.registry.release([entry])
            raise
        deadline = time.monotonic() + self.timeout_s
        job = Job(
            entry, packed, inputs, targets, params, deadline, self._future(), stream=stream, patience_s=self.timeout_s
        )
        refused = self.refusal()
        if refused is not None:
            self._release(job)
            raise refused
        self.loop.put(job)
        self.metrics.queue_depth.set(self.loop.waiting)
        return job

    async def wait(self, job: Job) -> list:
        """The accepted job's values; a timeout or the caller giving up cancels it (its rows leave at the next step).

        A stream's timeout bounds the wait for its first token and each gap between two, not the whole generation:
        its deadline moves with every token (a client reading a long answer as it comes is never cut off)."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(job.future), timeout=job.deadline - time.monotonic())
                except TimeoutError:
                    if not self._moved_on(job):
                        raise
        except TimeoutError:
            self._cancel(job)
            what = "sent no token" if job.stream is not None else "did not finish"
            raise RequestTimeout(f"request {what} within {self.timeout_s:g} s", retry_after=1) from None
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    @staticmethod
    def _moved_on(job: Job) -> bool:
        """A stream whose deadline the engine moved on (a token came) since this wait began."""
        return job.deadline > time.monotonic()

    async def submit(
        self,
        entry: Entry,
        inputs: list[list[int]],
        targets: list[list[int]] | None = None,
        params: GenerationParams | None = None,
        stream: TokenStream | None = None,
    ) -> list:
        """`accept` then `wait`."""
        return await self.wait(await self.accept(entry, inputs, targets, params, stream))

    def refusal(self, arriving: int = 0) -> KronserveError | None:
        """Why a new request would be refused now (None: it would be queued); `arriving` requests are on their way
        into the queue already and count as queued."""
        if not self._accepting:
            return NotReady("the server is not accepting requests (starting or shutting down)", retry_after=5)
        if not self.loop.alive and self.loop.started:
            return NotReady("the engine's step loop stopped", retry_after=5)
        if self.loop.waiting + arriving >= self.queue_size:
            return Overloaded(f"request queue is full ({self.queue_size} waiting); retry shortly", retry_after=1)
        return None

    async def _fetch(self, entry: Entry) -> Compact:
        """The version's packed weights: a host-tier hit here, else read and validated off the event loop, so the
        engine thread never waits on the store."""
        registry = self.engine.registry
        packed = registry.host.peek(entry.key)
        if packed is not None:
            return registry.fetch(entry)  # counts the hit and refreshes its LRU place
        return await asyncio.to_thread(registry.fetch, entry)

    def _cancel(self, job: Job) -> None:
        """The caller gave up: the loop drops the job at its next step (queued or running) and frees the lease."""
        job.cancelled = True
        job.future.cancel()
        self.loop.wake()

    def _release(self, job: Job) -> None:
        if job.take_lease():
            self.engine.registry.release([job.entry])

    @staticmethod
    def _future() -> asyncio.Future:
        return asyncio.get_running_loop().create_future()
