"""Slow and vanishing clients over real sockets: a client that leaves mid-upload is `client_closed` (499, no
traceback), a stalled body gets 408, a trickling request head and an idle keep-alive connection are closed, and
connections past the limit are refused, all with the timeouts set through KRONSERVE_* settings."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..e2e.conftest import Server
from .conftest import TIMEOUT, metric

HEAD_S, BODY_S, KEEPALIVE_S, MAX_CONNECTIONS = 1.5, 1.0, 1, 8
ENDPOINT = "/v1/adapters/{task}"


@pytest.fixture(scope="module")
def strict(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = {
        "KRONSERVE_HEADER_TIMEOUT_S": str(HEAD_S),
        "KRONSERVE_BODY_TIMEOUT_S": str(BODY_S),
        "KRONSERVE_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
        "KRONSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    s = Server(tiny_dir, tmp_path_factory.mktemp("connections") / "store", **limits).start()
    yield s
    s.stop()


def connect(s: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)


def upload_head(task: str, length: int) -> bytes:
    return (
        f"PUT /v1/adapters/{task} HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def wait_for(check: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_closing_mid_upload_is_client_closed_not_a_server_error(strict: Server) -> None:
    closed_before = metric(strict.url, "kronserve_requests_total", endpoint=ENDPOINT, status="499")
    with connect(strict) as sock:
        sock.sendall(upload_head("leaver", 1_000_000) + b"\0" * 65536)
        time.sleep(0.2)  # the server is reading the body
    wait_for(lambda: metric(strict.url, "kronserve_requests_total", endpoint=ENDPOINT, status="499") > closed_before)

    assert metric(strict.url, "kronserve_requests_total", endpoint=ENDPOINT, status="499") == closed_before + 1
    assert metric(strict.url, "kronserve_request_failures_total", endpoint=ENDPOINT, code="client_closed") >= 1
    assert metric(strict.url, "kronserve_requests_total", endpoint=ENDPOINT, status="500") == 0
    assert metric(strict.url, "kronserve_request_failures_total", endpoint=ENDPOINT, code="internal") == 0
    log = strict.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert not (strict.store / "leaver").exists()


def test_a_stalled_body_gets_408_and_the_connection_is_closed(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(upload_head("staller", 100_000) + b"\0" * 1000)
        answer, waited = until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert BODY_S * 0.9 <= waited < BODY_S + 10
    assert metric(strict.url, "kronserve_request_failures_total", endpoint=ENDPOINT, code="body_timeout") >= 1


def test_a_trickling_request_head_is_cut_off(strict: Server) -> None:
    """One byte every 0.2 s never completes the head: the deadline runs from the first byte, not the last."""
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
    with connect(strict) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):  # the server closes; sending then fails (EPIPE / ECONNRESET)
            for i in range(len(head)):
                sock.sendall(head[i : i + 1])
                time.sleep(0.2)
                if time.monotonic() - started > HEAD_S + 10:
                    pytest.fail("the server still holds a head that has trickled for 10 s past its deadline")
        assert time.monotonic() - started >= HEAD_S * 0.9


def test_a_silent_connection_is_closed_at_the_head_deadline(strict: Server) -> None:
    with connect(strict) as sock:
        answer, waited = until_closed(sock)
    assert answer == b"" and HEAD_S * 0.9 <= waited < HEAD_S + 10


def test_an_idle_keep_alive_connection_is_closed(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        answer, waited = until_closed(sock)
    assert answer == b"" and KEEPALIVE_S * 0.9 <= waited < KEEPALIVE_S + 10


def test_connections_past_the_limit_are_refused(strict: Server) -> None:
    held = [connect(strict) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # heads that are not complete yet
        time.sleep(0.3)
        refused = httpx.get(f"{strict.url}/healthz", timeout=TIMEOUT)
        assert refused.status_code == 503, refused.text
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(f"{strict.url}/healthz", timeout=TIMEOUT).status_code == 200)
