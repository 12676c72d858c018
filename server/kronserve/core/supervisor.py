"""The parent's watch over the engine process: start it, restart it when it dies, give up on a crash loop.

A dead engine is a restart, not an outage (vLLM V1 leaves the restart to an outside supervisor; kronserve
does it in place): the supervisor notices the death at once (the process sentinel, not a heartbeat) and
publishes `dead`, so every API process answers its in-flight requests with 503 `engine_restarting`, then
starts a new engine after a backoff and publishes `up` when it is ready. `crash_loop_deaths` deaths within
`crash_loop_s` (or an engine that cannot start the first time) publish `failed` and call `on_fatal`: the
server exits non-zero with the reason. The state is published again every `BEAT_S`, so an API process that
connects late (or misses a message: PUB drops what nobody reads yet) learns it within that time.

Engines are forked from a forkserver that has imported torch and the engine once, so a restart costs the
backbone's load, not the interpreter's start.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import zmq

from ..config import Settings
from . import wire

log = logging.getLogger(__name__)
BEAT_S = 0.5
ENGINE_MODULE = "kronserve.core.engine_process"


class Supervisor:
    def __init__(self, settings: Settings, on_fatal: Callable[[str], None]) -> None:
        self.settings, self.on_fatal = settings, on_fatal
        self.run_dir = Path(tempfile.mkdtemp(prefix="kronserve-"))
        self.engine_address = f"ipc://{self.run_dir}/engine"
        self.status_address = f"ipc://{self.run_dir}/status"
        self.generation = 0
        self.restarts = 0
        self.state: list[Any] = ["starting", 0, None]
        self.process: Any = None
        self._deaths: deque[float] = deque()
        self._stopping = threading.Event()
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([ENGINE_MODULE])
        self._thread = threading.Thread(target=self._watch, name="kronserve-supervisor", daemon=True)
        self._zmq = zmq.Context()
        self._pub = self._zmq.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)

    def start(self) -> None:
        self._pub.bind(self.status_address)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after `timeout_s`) and the watch."""
        self._stopping.set()
        self._thread.join(timeout_s)  # first: it starts no engine once stopping, so `process` is the last one
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join()
        self._pub.close()
        self._zmq.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---- the watch thread ------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.is_set():
            outcome, detail = self._run_one()
            if self._stopping.is_set():
                return
            if outcome == "failed" or self._crash_loop():
                reason = detail if outcome == "failed" else f"crash loop: {detail}"
                self._publish("failed", reason)
                log.error("engine: %s; the server stops", reason)
                self.on_fatal(reason)
                return
            self.restarts += 1
            backoff = min(0.25 * 2 ** (len(self._deaths) - 1), 10.0)
            log.error("engine died (%s); restarting in %.2f s", detail, backoff)
            self._stopping.wait(backoff)

    def _run_one(self) -> tuple[str, str]:
        """Start one engine and watch it until it dies: ("died", why) or ("failed", why it could not start)."""
        self.generation += 1
        receive, send = self._context.Pipe(duplex=False)
        from .engine_process import main  # the forkserver has it imported already

        settings = self.settings.model_dump_json()
        self.process = process = self._context.Process(
            target=main, args=(settings, self.engine_address, self.generation, send), name="kronserve-engine"
        )
        if self._stopping.is_set():
            return "stopped", ""
        process.start()
        send.close()
        was_up = False
        self._publish("starting", None)
        waiting: list[Any] = [receive, process.sentinel]
        while True:
            ready = wait(waiting, timeout=BEAT_S)
            if self._stopping.is_set():
                return "stopped", ""
            if receive in ready:
                try:
                    state, detail = receive.recv()
                except EOFError:  # the engine closed its end (it is exiting): watch the process alone
                    waiting = [process.sentinel]
                    continue
                if state == "up":
                    was_up = True
                    self._publish("up", detail)
                    log.info("engine %d up (pid %d)", self.generation, process.pid)
                    continue
                if state == "starting":  # what its start-up is doing (training the demo tasks...)
                    self._publish("starting", detail)
                    continue
                process.join()
                why = f"the engine could not start: {detail}"
            elif process.sentinel in ready:
                process.join()
                why = _why(process.exitcode)
            else:
                self._publish(self.state[0], self.state[2])  # the beat: late subscribers learn the state
                continue
            self._deaths.append(time.monotonic())
            if not was_up and self.generation == 1:
                return "failed", why
            self._publish("dead", why)
            return "died", why

    def _crash_loop(self) -> bool:
        now = time.monotonic()
        while self._deaths and now - self._deaths[0] > self.settings.engine_crash_window_s:
            self._deaths.popleft()
        return len(self._deaths) >= self.settings.engine_crash_deaths

    def _publish(self, state: str, detail: Any) -> None:
        self.state = [state, self.generation, detail]
        self._pub.send(wire.pack(state, self.generation, detail, self.restarts))


def _why(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
