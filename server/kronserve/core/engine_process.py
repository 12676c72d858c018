"""The engine process: the one owner of the model, the tiers and the step loop (vLLM V1's EngineCore).

It runs the in-process `Service` at the token level and answers the API processes over one ZMQ ROUTER
socket (`wire`): requests arrive as token ids and leave as token ids, so no HTTP, JSON parsing, pydantic,
tokenizing or detokenizing shares this interpreter with the step loop. Catalogue and residency commands
(upload, delete, pin…) are `call`s run here too, so the registry, its leases and the device pools have one
writer process. The supervisor (parent) learns over a pipe when this engine is up or failed to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

import torch
import zmq
import zmq.asyncio

from ..backbone import locate
from ..config import Settings
from ..errors import KronserveError
from ..front import Run
from ..service import Service
from . import wire

log = logging.getLogger(__name__)

# The `Backend` commands an API process may ask the engine to run, and whether each is a coroutine.
CALLS: dict[str, bool] = {
    "upload": True,
    "delete": True,
    "adapters": True,
    "adapter": True,
    "pin_task": True,
    "metrics_text": True,
    "readiness": True,
    "tiers": False,
}


def main(settings_json: str, address: str, generation: int, pipe: Connection) -> None:
    """The child's entry point (a forkserver child: torch and transformers are already imported)."""
    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    torch.set_num_threads(settings.intra_op_threads())
    asyncio.run(_serve(settings, address, generation, pipe))


async def _serve(settings: Settings, address: str, generation: int, pipe: Connection) -> None:
    service = Service(settings, on_phase=lambda phase: pipe.send(("starting", phase)))
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    try:
        await service.start()
    except Exception:
        pipe.send(("failed", service.startup_error or "start-up failed"))
        return
    source = service.engine.backbone.source
    pipe.send(("up", {"source": source, "local": locate(source), "max_input_tokens": settings.max_input_tokens}))
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    watching = asyncio.create_task(_watchdog(service, stopping))
    core = EngineCore(service, socket, generation)
    serving = asyncio.create_task(core.serve())
    await stopping.wait()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    watching.cancel()
    await service.stop()
    socket.close()
    context.term()


async def _watchdog(service: Service, stopping: asyncio.Event) -> None:
    """Stop when the server that started this engine is gone (SIGKILL leaves no one to send SIGTERM: the forkserver
    it was forked from exits with the server, and this process is re-parented); exit at once if the step loop died
    (a bug), so the supervisor starts a new engine instead of this one refusing everything."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
        if not service.scheduler.loop.alive:
            log.critical("the step loop died; the engine exits so that it is restarted")
            os._exit(70)
    log.error("the server that started this engine is gone; stopping")
    stopping.set()


class EngineCore:
    """Receives frames, runs each request as a task on the `Service`, sends its tokens and answer back."""

    def __init__(self, service: Service, socket: zmq.asyncio.Socket, generation: int) -> None:
        self.service, self.socket, self.generation = service, socket, generation
        self.tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self.runs: dict[tuple[bytes, int], Run] = {}
        self.arriving = 0  # requests received and not yet queued (or refused) by the scheduler

    async def serve(self) -> None:
        while True:
            peer, frame = await self.socket.recv_multipart()
            generation, kind, rid, body = wire.unpack(frame)
            if generation != self.generation:
                continue  # sent to the engine before this one; its sender was answered when that one died
            key = (peer, rid)
            if kind == "add":
                await self._add_or_refuse(key, peer, rid, body)
            elif kind == "call":
                self._start(key, self._call(peer, rid, *body))
            elif kind == "stop" and (run := self.runs.get(key)) is not None:
                run.stop(body)
            elif kind == "abort" and (task := self.tasks.get(key)) is not None:
                task.cancel()

    def _start(self, key: tuple[bytes, int], work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks[key] = task
        task.add_done_callback(lambda _: self.tasks.pop(key, None))

    async def _send(self, peer: bytes, *fields: Any) -> None:
        await self.socket.send_multipart([peer, wire.pack(*fields)])

    async def _add_or_refuse(self, key: tuple[bytes, int], peer: bytes, rid: int, body: dict[str, Any]) -> None:
        """A full queue refuses here, as each request arrives and in arrival order, before any work is spent on it."""
        try:
            refused = self.service.scheduler.refusal(self.arriving)
        except KronserveError as e:  # draining
            refused = e
        if refused is not None:
            await self._send(peer, "error", rid, wire.error_out(refused))
            return
        self.arriving += 1
        self._start(key, self._add(peer, rid, body))

    async def _add(self, peer: bytes, rid: int, body: dict[str, Any]) -> None:
        run: Run | None = None
        try:
            try:
                run = await self.service.open_run(
                    body["task"],
                    body["inputs"],
                    body["targets"],
                    wire.params_in(body["params"]),
                    wire.pin_in(body["pin"]),
                    body["stream"],
                )
            finally:
                self.arriving -= 1
            self.runs[(peer, rid)] = run
            s = run.started
            if body["stream"]:
                await self._send(peer, "started", rid, [s.task, s.version, s.replica])
                while (pairs := await run.tokens()) is not None:
                    await self._send(peer, "tokens", rid, pairs)
            values = await run.result()
            await self._send(peer, "done", rid, [s.task, s.version, s.replica, wire.outputs_out(values)])
        except asyncio.CancelledError:
            pass  # the caller left: the run is cancelled below, its rows leave at the next step
        except Exception as e:
            if not isinstance(e, KronserveError):
                log.exception("request %d failed in the engine", rid)
            await self._send(peer, "error", rid, wire.error_out(e))
        finally:
            self.runs.pop((peer, rid), None)
            if run is not None:
                run.cancel()

    async def _call(self, peer: bytes, rid: int, method: str, args: list[Any]) -> None:
        if method not in CALLS:
            await self._send(peer, "error", rid, wire.error_out(KronserveError(f"unknown engine call {method!r}")))
            return
        try:
            answer = getattr(self.service, method)(*args)
            value = await answer if CALLS[method] else answer
            await self._send(peer, "reply", rid, value)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            if not isinstance(e, KronserveError):
                log.exception("engine call %s failed", method)
            await self._send(peer, "error", rid, wire.error_out(e))
