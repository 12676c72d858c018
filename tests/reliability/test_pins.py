"""Pins never take the device past its budget: concurrent pins, re-uploads of pinned tasks, uploads with `pin=true`
and pins that fail are each checked once, atomically with the pin (`KRONSERVE_DEVICE_ADAPTER_MB=1`, LoRA adapters of
98,304 bytes: ten fit)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ..e2e.conftest import Server, upload
from .conftest import TIMEOUT, Payload, error_code

BUDGET = 1024 * 1024
SIZE = 98_304  # a rank-8 LoRA on the tiny backbone, float32
TASKS = [f"p{i:02d}" for i in range(30)]


def residency(url: str, task: str) -> dict:
    r = httpx.get(f"{url}/v1/adapters/{task}", params={"residency": True}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def pinned_bytes(url: str) -> int:
    infos = httpx.get(f"{url}/v1/adapters", params={"residency": True, "limit": 100}, timeout=TIMEOUT).json()
    return sum(i["residency"]["bytes"] for i in infos if i["residency"]["pinned"])


def put(url: str, task: str, data: bytes, **params: object) -> httpx.Response:
    return httpx.put(f"{url}/v1/adapters/{task}", params=params, files={"file": ("a", data)}, timeout=TIMEOUT)


def test_pins_and_pinned_uploads_never_pass_the_device_budget(tiny_dir: Path, tmp_path: Path, payload: Payload) -> None:
    server = Server(tiny_dir, tmp_path / "store", KRONSERVE_DEVICE_ADAPTER_MB="1").start()
    try:
        for i, task in enumerate(TASKS):
            assert upload(server.url, task, payload(task, "lora", seed=i, rank=8)).status_code == 201
        assert residency(server.url, TASKS[0])["residency"]["bytes"] == SIZE

        with ThreadPoolExecutor(len(TASKS)) as pool:
            answers = list(pool.map(lambda t: httpx.put(f"{server.url}/v1/adapters/{t}/pin", timeout=TIMEOUT), TASKS))
        accepted = [t for t, r in zip(TASKS, answers, strict=True) if r.status_code == 200]
        assert len(accepted) == BUDGET // SIZE
        assert all(error_code(r) == "pin_refused" for r in answers if r.status_code != 200)
        assert pinned_bytes(server.url) == len(accepted) * SIZE <= BUDGET

        # A pinned task's bigger new version: refused, nothing changes (version, hash, pin).
        before = residency(server.url, accepted[0])
        r = put(server.url, accepted[0], payload(accepted[0], "lora", seed=99, rank=16))
        assert r.status_code == 409 and error_code(r) == "pin_refused" and "device budget" in r.text
        assert residency(server.url, accepted[0]) == before
        # A new task uploaded with pin=true while pins fill the budget: refused, and not created.
        r = put(server.url, "fresh", payload("fresh", "lora", seed=7, rank=8), pin="true")
        assert r.status_code == 409 and error_code(r) == "pin_refused"
        assert httpx.get(f"{server.url}/v1/adapters/fresh", timeout=TIMEOUT).status_code == 404
        assert not (server.store / "fresh").exists()
        assert pinned_bytes(server.url) == len(accepted) * SIZE

        # Room made: the same upload is accepted, pinned and on the device.
        assert httpx.delete(f"{server.url}/v1/adapters/{accepted[1]}/pin", timeout=TIMEOUT).status_code == 200
        r = put(server.url, "fresh", payload("fresh", "lora", seed=7, rank=8), pin="true")
        assert r.status_code == 201 and r.json()["residency"] == {"tier": "device", "pinned": True, "bytes": SIZE}
        assert pinned_bytes(server.url) == len(accepted) * SIZE <= BUDGET
    finally:
        server.stop()
