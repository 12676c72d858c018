"""Issue acceptance against a real server: hot upload and swap, mixed batches, restart, bad input."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Server, upload

ALONE_TIMEOUT = 30


def predict(url: str, task: str, inputs: list[str], **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"task": task, "inputs": inputs, **kw}, timeout=ALONE_TIMEOUT)


def score(url: str, task: str, inputs: list[str], targets: list[str]) -> httpx.Response:
    body = {"task": task, "inputs": inputs, "targets": targets}
    return httpx.post(f"{url}/v1/score", json=body, timeout=ALONE_TIMEOUT)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_upload_then_predict_without_restart(server: Server, adapter_bytes) -> None:
    r = upload(server.url, "hot", adapter_bytes("hot", "compacter++", seed=1))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["task"] == "hot" and info["version"] == 1 and info["method"] == "compacter++"
    assert len(info["sha256"]) == 64 and info["params"] > 0
    p = predict(server.url, "hot", ["hello", "world"], max_new_tokens=4)
    assert p.status_code == 200 and p.json()["version"] == 1 and len(p.json()["outputs"]) == 2
    assert httpx.get(f"{server.url}/v1/adapters/hot").json()["sha256"] == info["sha256"]


def test_reupload_swaps_version_under_a_stream_of_requests(server: Server, adapter_bytes) -> None:
    assert upload(server.url, "swap", adapter_bytes("swap", seed=10)).status_code == 201
    expected = {1: score(server.url, "swap", ["q"], ["a"]).json()["scores"][0]}
    results: list[tuple[float, float, int, float]] = []  # (sent, answered, version, score)
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=ALONE_TIMEOUT) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post(f"{server.url}/v1/score", json={"task": "swap", "inputs": ["q"], "targets": ["a"]})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                results.append((sent, time.monotonic(), r.json()["version"], r.json()["scores"][0]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    returned: dict[int, float] = {}
    for seed in (11, 12, 13):
        time.sleep(0.3)
        r = upload(server.url, "swap", adapter_bytes("swap", seed=seed))
        assert r.status_code == 201
        returned[r.json()["version"]] = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert {v for _, _, v, _ in results} >= {1, 4}
    for version in (2, 3, 4):
        expected[version] = score(server.url, "swap", ["q"], ["a"]).json()["scores"][0] if version == 4 else None
    for sent, _, version, value in results:
        # Once a PUT has returned, no request sent after it is answered by an older version.
        newest_returned = max((v for v, at in returned.items() if at <= sent), default=1)
        assert version >= newest_returned
        if expected.get(version) is not None:
            assert value == pytest.approx(expected[version], abs=1e-4)


def test_concurrent_requests_over_16_tasks_ride_in_mixed_batches(server: Server, adapter_bytes) -> None:
    methods = ["compacter", "compacter++", "phm", "houlsby", "pfeiffer"]
    tasks = [f"mix{i}" for i in range(16)]
    for i, task in enumerate(tasks):
        extra = {"reduction_factor": 16} if methods[i % 5] == "phm" else {}
        assert upload(server.url, task, adapter_bytes(task, methods[i % 5], seed=100 + i, **extra)).status_code == 201
    requests = [(tasks[i % 16], f"input number {i}", f"target {i % 7}") for i in range(64)]
    batches_before = metric(server.url, "kronserve_batch_tasks_count")
    single_task_before = _bucket(server.url, "kronserve_batch_tasks_bucket", "1.0")

    async def fire() -> list[tuple[dict, dict]]:
        async with httpx.AsyncClient(timeout=ALONE_TIMEOUT) as c:

            async def one(task: str, x: str, y: str) -> tuple[dict, dict]:
                p = c.post(f"{server.url}/v1/predict", json={"task": task, "inputs": [x], "max_new_tokens": 6})
                s = c.post(f"{server.url}/v1/score", json={"task": task, "inputs": [x], "targets": [y]})
                rp, rs = await asyncio.gather(p, s)
                assert rp.status_code == 200 and rs.status_code == 200, (rp.text, rs.text)
                return rp.json(), rs.json()

            return await asyncio.gather(*(one(*r) for r in requests))

    answers = asyncio.run(fire())
    batches = metric(server.url, "kronserve_batch_tasks_count") - batches_before
    mixed = batches - (_bucket(server.url, "kronserve_batch_tasks_bucket", "1.0") - single_task_before)
    assert mixed >= 1, f"{batches} batches, none with more than one task"
    assert batches < 128  # requests really were merged
    for (task, x, y), (p, s) in zip(requests, answers, strict=True):
        alone_p = predict(server.url, task, [x], max_new_tokens=6).json()
        alone_s = score(server.url, task, [x], [y]).json()
        assert p == alone_p
        assert s["scores"] == pytest.approx(alone_s["scores"], abs=1e-4)


def _bucket(url: str, name: str, le: str) -> float:
    """Summed over label sets (a cluster labels each sample with its replica)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf'^{name}{{[^}}]*le="{le}"[^}}]*}} (\S+)$', text, re.M))


def test_list_get_and_delete(server: Server, adapter_bytes) -> None:
    infos = {t: upload(server.url, t, adapter_bytes(t, "houlsby", seed=i)).json() for i, t in enumerate(["ls1", "ls2"])}
    listed = {a["task"]: a for a in httpx.get(f"{server.url}/v1/adapters").json()}
    for task, info in infos.items():
        assert listed[task] == httpx.get(f"{server.url}/v1/adapters/{task}").json() == info
    assert httpx.delete(f"{server.url}/v1/adapters/ls1").status_code == 204
    assert "ls1" not in {a["task"] for a in httpx.get(f"{server.url}/v1/adapters").json()}
    assert httpx.get(f"{server.url}/v1/adapters/ls1").status_code == 404
    gone = score(server.url, "ls1", ["q"], ["a"])
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_task"
    assert httpx.delete(f"{server.url}/v1/adapters/ls1").status_code == 404
    assert score(server.url, "ls2", ["q"], ["a"]).json()["version"] == infos["ls2"]["version"]


def test_restart_brings_every_adapter_back(tiny_dir: Path, tmp_path: Path, adapter_bytes) -> None:
    first = Server(tiny_dir, tmp_path / "store").start()
    try:
        for i, method in enumerate(["compacter", "houlsby", "pfeiffer"]):
            assert upload(first.url, f"keep{i}", adapter_bytes(f"keep{i}", method, seed=i)).status_code == 201
        assert upload(first.url, "keep0", adapter_bytes("keep0", seed=50)).status_code == 201  # version 2
        listed = httpx.get(f"{first.url}/v1/adapters").json()
        answers = [score(first.url, f"keep{i}", ["in"], ["out"]).json() for i in range(3)]
    finally:
        assert first.stop() == 0
    second = Server(tiny_dir, tmp_path / "store").start()
    try:
        assert httpx.get(f"{second.url}/v1/adapters").json() == listed
        assert [score(second.url, f"keep{i}", ["in"], ["out"]).json() for i in range(3)] == answers
        assert answers[0]["version"] == 2
    finally:
        second.stop()
