"""SIGTERM: readiness turns 503 at once, accepted requests finish, new ones are refused, exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from .conftest import Server, upload


def test_sigterm_drains_accepted_work(tiny_dir: Path, tmp_path: Path, adapter_bytes) -> None:
    server = Server(tiny_dir, tmp_path / "store", KRONSERVE_MAX_BATCH_ROWS="4").start()
    assert upload(server.url, "slow", adapter_bytes("slow", seed=1)).status_code == 201
    body = {"task": "slow", "inputs": ["x"], "max_new_tokens": 150, "min_new_tokens": 150}
    answers: list[int] = []

    def call() -> None:
        answers.append(httpx.post(f"{server.url}/v1/predict", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=call) for _ in range(12)]  # 3 batches of 4: several seconds of work
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    late = httpx.post(f"{server.url}/v1/predict", json=body, timeout=5)
    assert late.status_code == 503 and "Retry-After" in late.headers
    for t in threads:
        t.join()
    assert answers == [200] * 12
    assert server.proc.wait(timeout=60) == 0
