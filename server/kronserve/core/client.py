"""The API process's `Backend`: text in and out here, token ids to and from the engine process.

Each request is a `RemoteRun` keyed by a request id; one reader task routes the engine's frames to them.
The supervisor's state feed decides what this process promises: while the engine is not `up`, `/readyz`
is 503 and new requests are refused with 503 `engine_restarting`; the moment it is `dead`, every request
and command in flight is answered with that 503 (their engine is gone; the store still holds everything
acknowledged). The tokenizer is loaded here from the engine's backbone source once the engine is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from ..config import Settings
from ..errors import EngineRestarting, NotReady
from ..front import TextFront
from ..messages import STARTING, GenerationParams, Started, StreamedToken
from ..metrics import Metrics, merged_sum
from ..store import VersionRef
from ..text import TextCodec
from . import wire

log = logging.getLogger(__name__)
# A request the engine never answers (a hung engine) is answered after its timeout and this much more.
GRACE_S = 5.0
SETTLE_S = 1.0  # see EngineClient._settled


class RemoteRun:
    """One request in the engine, as `front.Run`: tokens arrive per step, then its values or its error."""

    def __init__(self, client: EngineClient, rid: int, outputs: bool) -> None:
        self.client, self.rid, self.outputs = client, rid, outputs
        self.started = Started("", 0)
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.queue: asyncio.Queue[list[StreamedToken] | None] = asyncio.Queue()

    # ---- frames from the engine (the reader task) -----------------------------------------------
    def on_started(self, task: str, version: int, replica: str | None) -> None:
        self.started = Started(task, version, replica)
        _settle(self.accepted, None)

    def on_done(self, task: str, version: int, replica: str | None, values: list[Any]) -> None:
        self.on_started(task, version, replica)
        _settle(self.answer, wire.outputs_in(values) if self.outputs else list(values))
        self.queue.put_nowait(None)

    def on_error(self, error: BaseException) -> None:
        for future in (self.accepted, self.answer):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: whoever awaits it raises it; nobody awaiting is no warning
        self.queue.put_nowait(None)

    # ---- front.Run ---------------------------------------------------------------------------------
    async def tokens(self) -> list[StreamedToken] | None:
        try:
            pairs = await asyncio.wait_for(self.queue.get(), self.client.settings.request_timeout_s + GRACE_S)
        except TimeoutError:
            self.cancel()
            raise EngineRestarting("the engine sent nothing for this stream in time", retry_after=5) from None
        if pairs is None:
            return None
        while not self.queue.empty():  # several steps' tokens at once: one batch for the text side
            more = self.queue.get_nowait()
            if more is None:
                self.queue.put_nowait(None)  # the end, for the next call
                break
            pairs = pairs + more
        return pairs

    async def result(self) -> list[Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(self.answer), self.client.settings.request_timeout_s + GRACE_S)
        except TimeoutError:
            self.cancel()
            raise EngineRestarting("the engine did not answer this request in time", retry_after=5) from None
        except asyncio.CancelledError:
            self.cancel()
            raise

    def stop(self, index: int) -> None:
        self.client.send("stop", self.rid, index)

    def cancel(self) -> None:
        if self.client.runs.pop(self.rid, None) is not None and not self.answer.done():
            self.client.send("abort", self.rid, None)
            self.answer.cancel()


class EngineClient(TextFront):
    def __init__(self, settings: Settings, engine_address: str, status_address: str) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.metrics_max_tasks)
        self.engine_address, self.status_address = engine_address, status_address
        self.state, self.generation, self.detail = "starting", 0, None
        self.startup_error: str | None = None
        self.draining = False
        self.runs: dict[int, RemoteRun] = {}
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._codec: TextCodec | None = None
        self._restarts_seen = 0
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._status = self._context.socket(zmq.SUB)
        self._status.setsockopt(zmq.LINGER, 0)
        self._status.setsockopt(zmq.SUBSCRIBE, b"")
        self._tasks: list[asyncio.Task[None]] = []
        self._up_event: asyncio.Event | None = None

    # ---- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._up_event = asyncio.Event()
        self._socket.connect(self.engine_address)
        self._status.connect(self.status_address)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        self.begin_drain()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._socket.close()
        self._status.close()
        self._context.term()

    def begin_drain(self) -> None:
        self.draining = True

    def wait_drained(self, timeout_s: float) -> None:
        """Block (off the event loop) until no request of this process is in the engine, or timeout."""
        deadline = time.monotonic() + timeout_s
        while self.runs and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def ready(self) -> bool:
        return self.state == "up" and self._codec is not None and not self.draining

    @property
    def codec(self) -> TextCodec:
        self._check()
        assert self._codec is not None
        return self._codec

    # ---- the Backend protocol ------------------------------------------------------------------
    async def readiness(self) -> dict[str, object]:
        self._check(NotReady)
        return await self._call("readiness")

    async def open_run(
        self,
        task: str,
        inputs: list[list[int]],
        targets: list[list[int]] | None,
        params: GenerationParams | None,
        pin: VersionRef | None,
        stream: bool,
    ) -> RemoteRun:
        await self._settled()
        rid = next(self._ids)
        run = self.runs[rid] = RemoteRun(self, rid, outputs=params is not None)
        body = {
            "task": task,
            "inputs": inputs,
            "targets": targets,
            "params": wire.params_out(params),
            "pin": wire.pin_out(pin),
            "stream": stream,
        }
        self.send("add", rid, body)
        if stream:
            try:
                await asyncio.wait_for(run.accepted, self.settings.request_timeout_s + GRACE_S)
            except BaseException:
                run.cancel()
                raise
        return run

    async def upload(self, task: str, parts: dict[str, bytes], pin: bool = False) -> dict[str, object]:
        return await self._call("upload", task, parts, pin)

    async def delete(self, task: str) -> None:
        await self._call("delete", task)

    async def adapters(
        self, after: str | None = None, limit: int | None = None, residency: bool = False
    ) -> tuple[list[dict[str, object]], str | None]:
        entries, cursor = await self._call("adapters", after, limit, residency)
        return entries, cursor

    async def adapter(self, task: str, pin: VersionRef | None = None, residency: bool = False) -> dict[str, object]:
        return await self._call("adapter", task, None, residency)

    async def pin_task(self, task: str, pinned: bool) -> dict[str, object]:
        return await self._call("pin_task", task, pinned)

    async def metrics_text(self) -> bytes:
        """This process's metrics and the engine's as one exposition (counters and histograms summed)."""
        own = self.metrics.render()
        if self.state != "up":
            return own
        try:
            engine = await self._call("metrics_text")
        except EngineRestarting:
            return own
        return merged_sum([own, engine])

    # ---- frames ----------------------------------------------------------------------------------
    def send(self, kind: str, rid: int, body: Any) -> None:
        self._socket.send(wire.pack(self.generation, kind, rid, body), copy=False)

    async def _call(self, method: str, *args: Any) -> Any:
        await self._settled()
        rid = next(self._ids)
        future = self.calls[rid] = asyncio.get_running_loop().create_future()
        self.send("call", rid, [method, list(args)])
        try:
            return await asyncio.wait_for(future, self.settings.request_timeout_s + GRACE_S)
        except TimeoutError:
            raise EngineRestarting(f"the engine did not answer {method} in time", retry_after=5) from None
        finally:
            self.calls.pop(rid, None)

    async def _read(self) -> None:
        while True:
            frame = await self._socket.recv()
            try:
                self._route(*wire.unpack(frame))
            except Exception:  # one bad frame must not stop every later answer
                log.exception("a frame from the engine could not be handled")

    def _route(self, kind: str, rid: int, body: Any) -> None:
        if kind == "reply" or (kind == "error" and rid in self.calls):
            future = self.calls.get(rid)
            if future is not None and not future.done():
                future.set_result(body) if kind == "reply" else future.set_exception(wire.error_in(body))
            return
        run = self.runs.get(rid)
        if run is None:
            return  # aborted here already
        if kind == "tokens":
            run.queue.put_nowait(body)
        elif kind == "started":
            run.on_started(*body)
        elif kind in ("done", "error"):
            self.runs.pop(rid, None)
            run.on_done(*body) if kind == "done" else run.on_error(wire.error_in(body))

    async def _watch(self) -> None:
        """Follow the supervisor's state feed (see `supervisor`); a failure handling one message (the tokenizer could
        not load) is logged and the next beat tries again."""
        while True:
            message = await self._status.recv()
            try:
                await self._follow(*wire.unpack(message))
            except Exception:
                log.exception("the engine's state could not be followed")

    async def _follow(self, state: str, generation: int, detail: Any, restarts: int) -> None:
        if restarts > self._restarts_seen:
            self.metrics.engine_restarts.inc(restarts - self._restarts_seen)
            self._restarts_seen = restarts
        if state == "up" and (self.state != "up" or generation != self.generation):
            if self.state == "up":  # a death and restart this process missed entirely
                self._lost("replaced", f"engine {self.generation} was replaced by engine {generation}")
            await self._up(generation, detail)
        elif state in ("dead", "failed", "starting") and generation >= self.generation:
            if state != "starting" or self.state == "up":
                self._lost(state, detail)
            self.state, self.generation, self.detail = state, generation, detail
            if state == "failed":
                self.startup_error = detail

    async def _up(self, generation: int, info: dict[str, Any]) -> None:
        if self._codec is None:
            self._codec = await asyncio.to_thread(
                TextCodec.load, info["source"], info["local"], info["max_input_tokens"]
            )
        self.state, self.generation, self.detail = "up", generation, info
        if self._up_event is not None:
            self._up_event.set()
        log.info("engine %d is up", generation)

    def _lost(self, state: str, why: str | None) -> None:
        """The engine under every request in flight is gone: answer them all now."""
        if self._up_event is not None:
            self._up_event.clear()
        error = EngineRestarting(f"the engine stopped ({why}); it is restarting: retry shortly", retry_after=2)
        runs, self.runs = self.runs, {}
        for run in runs.values():
            run.on_error(error)
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        if runs or calls:
            log.error("engine %s (%s): %d requests answered 503", state, why, len(runs) + len(calls))

    async def _settled(self) -> None:
        """Refuse unless the engine is up, after waiting up to `SETTLE_S` for it: API workers learn of the engine
        each on its own (within the supervisor's beat), so one may still be catching up when another said ready."""
        if not self.ready and self.state != "failed" and not self.draining and self._up_event is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up_event.wait(), SETTLE_S)
        self._check()

    def _check(self, error: type[NotReady] | type[EngineRestarting] = EngineRestarting) -> None:
        if self.draining:
            raise NotReady("the server is not accepting requests (shutting down)", retry_after=5)
        if self.state == "failed":
            raise NotReady(f"not ready: the engine failed: {self.detail}", retry_after=5)
        if self.state != "up" or self._codec is None:
            what = "starting" if self.generation <= 1 and self.state == "starting" else "restarting"
            doing = self.detail if self.state == "starting" and isinstance(self.detail, str) else STARTING
            raise error(f"not ready: the engine is {what} ({doing})", retry_after=5)


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
