"""A dead engine is a restart, not an outage: the engine process is SIGKILLed under running requests (a plain one and
a stream); both are answered with 503 `engine_restarting` (the stream, already begun, with that error event), the
server stays up (`/healthz` 200) and is ready again with its engine restarted, every acknowledged adapter answers as
before, and the restart is counted. A crash loop stops the server with the reason."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, Reference, ask, error_code, metric

TASK = "survivor"
LONG = {"task": TASK, "inputs": ["a long generation"] * 32, "max_new_tokens": 512, "min_new_tokens": 512}


def until(condition, what: str, timeout_s: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def stream_events(url: str, out: list) -> None:
    with httpx.stream("POST", f"{url}/v1/predict", json={**LONG, "stream": True}, timeout=TIMEOUT) as r:
        out.append(r.status_code)
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: ") :])))
                name = None


def test_a_dead_engine_answers_its_requests_503_and_comes_back_with_everything(
    server: Server, payload: Payload, reference: Reference
) -> None:
    data = payload(TASK, seed=21)
    assert upload(server.url, TASK, data).status_code == 201
    want = reference.answer(data)
    plain: list[httpx.Response] = []
    streamed: list = []

    def post() -> None:
        plain.append(httpx.post(f"{server.url}/v1/predict", json=LONG, timeout=TIMEOUT))

    admitted = metric(server.url, "kronserve_queue_wait_seconds_count")
    workers = [threading.Thread(target=post), threading.Thread(target=stream_events, args=(server.url, streamed))]
    for w in workers:
        w.start()
    until(lambda: metric(server.url, "kronserve_queue_wait_seconds_count") >= admitted + 2, "never both admitted")
    until(lambda: streamed, "the stream never began (it does with its first tokens)")
    os.kill(server.engine_pid, signal.SIGKILL)
    for w in workers:
        w.join(TIMEOUT)

    (answer,) = plain
    assert answer.status_code == 503 and error_code(answer) == "engine_restarting", answer.text
    assert int(answer.headers["retry-after"]) >= 1
    assert streamed[0] == 200 and streamed[-1][0] == "error"
    assert streamed[-1][1]["error"]["code"] == "engine_restarting"
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200

    until(lambda: httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 200, "not ready again")
    version, got = ask(server.url, TASK)
    assert version == 1 and got.matches(want)
    assert metric(server.url, "kronserve_engine_restarts_total") == 1


def test_a_crash_loop_stops_the_server_with_the_reason(tiny_dir: Path, tmp_path: Path) -> None:
    server = Server(tiny_dir, tmp_path / "store", KRONSERVE_ENGINE_CRASH_DEATHS="2").start()
    assert server.proc is not None
    os.kill(server.engine_pid, signal.SIGKILL)
    until(lambda: httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 200, "not ready again")
    os.kill(server.engine_pid, signal.SIGKILL)  # the second death within the window
    assert server.proc.wait(timeout=TIMEOUT) != 0
    log = server.log.read_text()
    assert "error: crash loop" in log and "killed by signal 9" in log, log[-2000:]
