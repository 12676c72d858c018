"""The step loop through a real server: body and input bounds before any work, and a client that leaves
frees its rows and its lease at the next step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..reliability.conftest import metric
from .conftest import Server, upload

LIMIT = 1_000_000


@pytest.fixture(scope="module")
def loop_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter_bytes) -> Iterator[Server]:
    s = Server(tiny_dir, tmp_path_factory.mktemp("loop-store"), KRONSERVE_MAX_REQUEST_BYTES=str(LIMIT)).start()
    assert upload(s.url, "task", adapter_bytes("task", "houlsby", seed=3)).status_code == 201
    yield s
    s.stop()


def test_a_huge_predict_body_is_refused_while_streaming(loop_server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"task": "task", "inputs": ['
        for i in range(64):
            yield (b'"' + b"x" * 1_000_000 + b'"') + (b"," if i < 63 else b"")
        yield b"]}"

    r = httpx.post(f"{loop_server.url}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    declared = httpx.post(f"{loop_server.url}/v1/score", content=b"{" + b" " * (LIMIT + 1) + b"}")
    assert declared.status_code == 413
    assert httpx.get(f"{loop_server.url}/healthz").status_code == 200
    assert (
        metric(loop_server.url, "kronserve_request_failures_total", endpoint="/v1/predict", code="payload_too_large")
        == 1
    )


def test_an_input_too_long_to_fit_is_refused_before_tokenizing(loop_server: Server) -> None:
    body = {"task": "task", "inputs": ["ok", "y" * 200_000]}
    r = httpx.post(f"{loop_server.url}/v1/predict", json=body)
    assert r.status_code == 422 and "input 1 has 200000 characters" in r.json()["error"]["message"], r.text


def test_a_client_that_leaves_frees_its_rows_and_its_lease(loop_server: Server, adapter_bytes) -> None:
    assert upload(loop_server.url, "leaver", adapter_bytes("leaver", "lora", seed=4)).status_code == 201
    body = {"task": "leaver", "inputs": ["a"] * 16, "max_new_tokens": 512, "min_new_tokens": 512, "num_beams": 8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{loop_server.url}/v1/predict", json=body, timeout=1.0)  # the client closes its socket
    deadline = time.monotonic() + 10
    while metric(loop_server.url, "kronserve_cancelled_requests_total", stage="running") < 1:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    assert (
        metric(loop_server.url, "kronserve_request_failures_total", endpoint="/v1/predict", code="client_closed") == 1
    )
    assert httpx.delete(f"{loop_server.url}/v1/adapters/leaver").status_code == 204
    # The lease is gone with the rows: deleting the task frees its slot at once (only "task" stays resident).
    assert metric(loop_server.url, "kronserve_adapters_resident") == 1
    quick = httpx.post(f"{loop_server.url}/v1/predict", json={"task": "task", "inputs": ["b"], "max_new_tokens": 2})
    assert quick.status_code == 200
