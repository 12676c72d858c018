"""Streams under refusal, time and a client that stops reading (and, on the same server's damaged stored file, a pin
that cannot read its weights):
- everything that refuses a stream (a full queue, a timeout while queued, an adapter that cannot be read) does so
  before the first byte: the same status and `Retry-After` as without `stream`, and counted so in the metrics;
- the request timeout bounds a stream's wait for its first token and each gap between tokens, not its whole run:
  a stream longer than the timeout is answered whole, while the same request unstreamed times out;
- a client that reads nothing is dropped after `KRONSERVE_STREAM_WRITE_TIMEOUT_S` and its rows leave the engine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ..e2e.conftest import Server, upload
from .conftest import Payload, error_code, metric

TASK = "streamer"
TIMEOUT_S = 2  # the server's request timeout
LONG = {"task": TASK, "inputs": ["hello world"] * 16, "max_new_tokens": 768, "min_new_tokens": 768}  # ~5 s


@pytest.fixture(scope="module")
def streams(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, payload: Payload) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("streams") / "store"
    first = Server(tiny_dir, store).start()  # a task whose stored file is damaged after upload (same size)
    assert upload(first.url, "damaged", payload("damaged", seed=2)).status_code == 201
    first.stop()
    (path,) = (store / "damaged").glob("v*.safetensors")
    path.write_bytes(path.read_bytes()[:-8] + bytes(8))
    env = {
        "KRONSERVE_QUEUE_SIZE": "1",
        "KRONSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "KRONSERVE_STREAM_WRITE_TIMEOUT_S": "1",
        "KRONSERVE_MAX_NEW_TOKENS": "1024",
    }
    server = Server(tiny_dir, store, **env).start()
    assert upload(server.url, TASK, payload(TASK, "lora", seed=6, std=2.0, rank=8)).status_code == 201
    yield server
    server.stop()


def stream(url: str, body: dict) -> tuple[int, dict[str, str], str]:
    with httpx.stream("POST", f"{url}/v1/predict", json={**body, "stream": True}, timeout=120) as r:
        return r.status_code, dict(r.headers), r.read().decode()


def streamed_outputs(text: str, inputs: int) -> list[str] | None:
    """The texts the deltas add up to, if the stream ended with its `done` event (None otherwise)."""
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    if events[-1][0] != "event: done":
        return None
    deltas = [json.loads(e[0].removeprefix("data: ")) for e in events if e[0].startswith("data: ")]
    return ["".join(d["text"] for d in deltas if d["index"] == i) for i in range(inputs)]


def test_refused_streams_are_plain_errors_before_the_first_byte(streams: Server) -> None:
    before = metric(streams.url, "kronserve_requests_total", endpoint="/v1/predict", status="503")
    body = {"task": TASK, "inputs": ["hello world", "again"], "max_new_tokens": 64, "min_new_tokens": 64}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: stream(streams.url, body), range(12)))
    refused = [(h, t) for status, h, t in answers if status == 503]
    assert refused and len(refused) < len(answers)  # a queue of one: some wait, some are refused
    for headers, text in refused:
        assert headers["content-type"] == "application/json" and "retry-after" in headers
        assert json.loads(text)["error"]["code"] in ("overloaded", "timeout")
    for status, _, text in answers:
        assert status == 503 or streamed_outputs(text, 2) is not None, text
    after = metric(streams.url, "kronserve_requests_total", endpoint="/v1/predict", status="503")
    assert after - before == len(refused)

    status, headers, text = stream(streams.url, {**body, "task": "damaged"})
    assert (status, json.loads(text)["error"]["code"]) == (503, "store_error") and "retry-after" in headers


def test_the_timeout_bounds_a_streams_gaps_not_its_whole_run(streams: Server) -> None:
    started = time.monotonic()
    status, _, text = stream(streams.url, LONG)
    took = time.monotonic() - started
    assert status == 200 and took > TIMEOUT_S
    outputs = streamed_outputs(text, 16)
    assert outputs is not None and all(outputs), text[-300:]
    whole = httpx.post(f"{streams.url}/v1/predict", json=LONG, timeout=120)
    assert whole.status_code == 503 and error_code(whole) == "timeout"


def test_a_client_that_stops_reading_is_dropped_and_its_rows_freed(streams: Server) -> None:
    """The kernel takes ~3 MB of a loopback stream nobody reads before the server's writes block: 64 completions
    of 1,024 tokens send ~11 MB of chunks over ~20 s, so the writes block long before the generation ends."""
    cancelled = lambda: metric(streams.url, "kronserve_cancelled_requests_total", stage="running")  # noqa: E731
    before = cancelled()
    prompts = ["hello world"] * 64
    body = {"model": TASK, "prompt": prompts, "max_tokens": 1024, "min_tokens": 1024, "temperature": 0, "stream": True}
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill sooner
    sock.connect(("127.0.0.1", streams.port))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
    sock.sendall(head.encode() + b"\r\n\r\n" + data)
    deadline = time.monotonic() + 120
    while cancelled() == before:  # never reading: the write deadline drops the connection, the rows leave running
        assert time.monotonic() < deadline, "a stream nobody reads kept its rows"
        time.sleep(0.2)
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):  # what was in flight, then the end of an aborted connection
            pass
    except ConnectionResetError:
        pass
    sock.close()


def test_a_pin_that_cannot_read_its_weights_is_not_recorded(streams: Server, payload: Payload) -> None:
    """The damaged stored file refuses the pin (503) and leaves no pin behind for the task's next version."""
    r = httpx.put(f"{streams.url}/v1/adapters/damaged/pin", timeout=60)
    assert r.status_code == 503 and error_code(r) == "store_error"
    data = payload("damaged", "lora", seed=2, rank=16)
    r = httpx.put(f"{streams.url}/v1/adapters/damaged", files={"file": ("a", data)}, timeout=60)
    assert r.status_code == 201
    info = httpx.get(f"{streams.url}/v1/adapters/damaged", params={"residency": True}, timeout=60).json()
    assert info["version"] == 2 and info["residency"]["pinned"] is False
