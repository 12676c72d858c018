"""Issue 7 acceptance on one machine: a local Ray head, 2 replicas of a tiny backbone, adapters in an
S3-compatible bucket (a real moto server), Redis change feed.

Every answer is compared with a single-process server's answer for the same adapter and input.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from ..e2e.conftest import Server, upload

TASKS = [f"c{i}" for i in range(12)]
METHODS = ["compacter", "compacter++", "houlsby", "pfeiffer", "lora"]
X, Y = "the same input", "a target"


@pytest.fixture(scope="module")
def cluster(cluster_server: Server) -> Server:
    """The session's cluster (tests/conftest.py): 2 replicas, adapters in the moto bucket, the Redis feed."""
    return cluster_server


@pytest.fixture(scope="module")
def single(single_server: Server) -> Server:
    """The session's single-process server: the reference answers."""
    return single_server


@pytest.fixture(scope="module")
def uploaded(cluster: Server, single: Server, adapter_bytes) -> dict[str, bytes]:
    files = {t: adapter_bytes(t, METHODS[i % len(METHODS)], seed=i) for i, t in enumerate(TASKS)}
    for task, data in files.items():
        assert upload(cluster.url, task, data).status_code == 201
        assert upload(single.url, task, data).status_code == 201
    return files


def ask(url: str, task: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", json={"task": task, "inputs": [X], "targets": [Y]}, timeout=60)


def replicas(url: str) -> dict[str, dict]:
    return {r["name"]: r for r in httpx.get(f"{url}/v1/cluster", timeout=30).json()}


def test_each_task_on_one_replica_both_used_answers_equal_one_process(
    cluster: Server, single: Server, uploaded: dict[str, bytes]
) -> None:
    async def fire() -> list[tuple[str, httpx.Response, httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as c:

            async def one(task: str, i: int) -> tuple[str, httpx.Response, httpx.Response]:
                body = {"task": task, "inputs": [f"{X} {i}"], "max_new_tokens": 5}
                p = c.post(f"{cluster.url}/v1/predict", json=body)
                s = c.post(f"{cluster.url}/v1/score", json={"task": task, "inputs": [f"{X} {i}"], "targets": [Y]})
                return (task, *await asyncio.gather(p, s))

            return await asyncio.gather(*(one(t, i) for i in range(4) for t in TASKS))

    before = httpx.get(f"{cluster.url}/metrics", timeout=30).text  # the session's cluster: earlier tests' batches
    served_by: dict[str, set[str]] = defaultdict(set)
    for n, (task, p, s) in enumerate(asyncio.run(fire())):
        assert p.status_code == 200 and s.status_code == 200, (p.text, s.text)
        served_by[task] |= {p.headers["x-kronserve-replica"], s.headers["x-kronserve-replica"]}
        i = n // len(TASKS)
        body = {"task": task, "inputs": [f"{X} {i}"], "max_new_tokens": 5}
        assert p.json() == httpx.post(f"{single.url}/v1/predict", json=body, timeout=60).json()
        alone = httpx.post(f"{single.url}/v1/score", json={"task": task, "inputs": [f"{X} {i}"], "targets": [Y]})
        assert s.json()["scores"] == pytest.approx(alone.json()["scores"], abs=1e-4)
    assert all(len(names) == 1 for names in served_by.values()), served_by
    assert set().union(*served_by.values()) == {"replica-0", "replica-1"}
    for name, info in replicas(cluster.url).items():  # each replica reports its own tiers
        device, host = info["tiers"]["device"], info["tiers"]["host"]
        assert device["adapters"] >= 1 and 0 < device["bytes"] <= device["budget_bytes"], (name, info["tiers"])
        assert host["adapters"] >= device["adapters"] and host["budget_bytes"] > 0, (name, info["tiers"])
    after = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    for name in ("replica-0", "replica-1"):
        mixed = _mixed_batches(after, name) - _mixed_batches(before, name)
        assert mixed >= 1, f"{name}: no batch of this test's requests had more than one task"


def test_replica_death_then_upload_reaches_every_holder(
    cluster: Server, single: Server, uploaded: dict[str, bytes], adapter_bytes
) -> None:
    task = next(t for t in TASKS if ask(cluster.url, t).headers["x-kronserve-replica"] == "replica-1")
    expected = ask(single.url, task).json()["scores"]
    victim = replicas(cluster.url)["replica-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    answers = [ask(cluster.url, task) for _ in range(5)]
    for r in answers:  # nothing was in flight on it: every request is answered, by the next replica
        assert r.status_code == 200, r.text
        assert r.json()["scores"] == pytest.approx(expected, abs=1e-4)
    assert answers[-1].headers["x-kronserve-replica"] == "replica-0"

    deadline = time.monotonic() + 180
    while not ((r1 := replicas(cluster.url)["replica-1"]).get("routable") and r1["pid"] != victim):
        assert time.monotonic() < deadline, "Serve did not replace the dead replica"
        time.sleep(0.5)
    assert ask(cluster.url, task).headers["x-kronserve-replica"] == "replica-1"  # back on its owner
    assert all(task in r["tasks"] for r in replicas(cluster.url).values())  # the spill left a copy on replica-0

    new = adapter_bytes(task, "houlsby", seed=99)
    put = upload(cluster.url, task, new)
    returned = time.monotonic()
    assert put.status_code == 201
    version = put.json()["version"]
    while not all(r["tasks"].get(task) == version for r in replicas(cluster.url).values()):
        assert time.monotonic() - returned < 1.0, "an upload did not reach every replica holding the task in 1 s"
        time.sleep(0.02)
    assert upload(single.url, task, new).status_code == 201
    expected = ask(single.url, task).json()["scores"]
    for _ in range(4):
        r = ask(cluster.url, task)
        assert r.json()["version"] == version and r.json()["scores"] == pytest.approx(expected, abs=1e-4)


def test_readyz_names_every_replica(cluster: Server) -> None:
    r = httpx.get(f"{cluster.url}/readyz", timeout=30)
    assert r.status_code == 200 and r.json()["replicas"] == {"replica-0": "ready", "replica-1": "ready"}


def _sample(text: str, name: str, replica: str, extra: str = "") -> float:
    pattern = rf"^{name}{{([^}}]*)}} (\S+)$"
    return sum(
        float(v)
        for labels, v in re.findall(pattern, text, re.M)
        if f'replica="{replica}"' in labels and extra in labels
    )


def _mixed_batches(metrics: str, replica: str) -> float:
    """Batches on `replica` with more than one task: all of them less those in the 1-task bucket."""
    return _sample(metrics, "kronserve_batch_tasks_count", replica) - _sample(
        metrics, "kronserve_batch_tasks_bucket", replica, 'le="1.0"'
    )


@pytest.mark.parametrize("path", ["deploy/serve_config.yaml", "deploy/rayservice.yaml"])
def test_deploy_examples_name_only_real_settings(path: str) -> None:
    import yaml

    from kronserve.cluster.app import build_app
    from kronserve.config import Settings

    doc = yaml.safe_load((Path(__file__).parents[2] / path).read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc
    (app,) = serve_config["applications"]
    assert app["import_path"] == "kronserve.cluster.app:build_app" and callable(build_app)
    assert set(app["args"]) <= set(Settings.model_fields), set(app["args"]) - set(Settings.model_fields)
    Settings(**app["args"])
