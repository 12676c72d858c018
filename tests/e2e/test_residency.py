"""Tiered residency through a real server over a real store of 400 tasks: a lazy start (headers only), paged
listing, answers that equal each task's own under a device budget of three adapters, pins that hold, and the tier
metrics that show it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kronserve.backbone import load_backbone
from kronserve.engine import Engine
from kronserve.formats.native import dumps
from kronserve.store import LocalStore
from kronserve_client import KronserveClient

from ..conftest import make_adapter
from ..reliability.conftest import metric
from .conftest import Server, upload

TASKS = [f"task{i:04d}" for i in range(400)]
DISTINCT = 8  # task i serves adapter i % 8
TEXT, TARGET = "residency check", "an answer"


@pytest.fixture(scope="module")
def catalogue(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[str]]:
    """(store, one adapter's packed bytes, the answer of adapter k alone), the answers from an in-process engine."""
    bb = load_backbone(str(tiny_dir), device="cpu")
    adapters = [make_adapter(bb, f"a{k}", "compacter", seed=k, std=0.3) for k in range(DISTINCT)]
    store_dir = tmp_path_factory.mktemp("catalogue") / "store"
    store = LocalStore(store_dir)
    files = [dumps(a) for a in adapters]
    for i, task in enumerate(TASKS):
        store.activate(store.write(task, files[i % DISTINCT]))
    engine = Engine(bb)
    for a in adapters:
        engine.load(a)
    answers = [engine.score([a.task], [TEXT], [TARGET]).scores[0] for a in adapters]
    assert len(set(answers)) == DISTINCT  # each adapter answers differently: a mix-up cannot pass unseen
    return store_dir, adapters[0].spec.param_count(bb.fingerprint.geometry) * 4, answers


def score(url: str, task: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", json={"task": task, "inputs": [TEXT], "targets": [TARGET]}, timeout=60)


@pytest.fixture(scope="module")
def tiered(tiny_dir: Path, catalogue) -> Iterator[Server]:
    store, size, _ = catalogue
    env = {
        "KRONSERVE_DEVICE_ADAPTER_MB": str(3 * size / 2**20),
        "KRONSERVE_HOST_ADAPTER_MB": str(5 * size / 2**20),
        "KRONSERVE_PINNED_TASKS": "task0000",
    }
    s = Server(tiny_dir, store, **env).start()
    yield s
    s.stop()


def test_a_start_over_400_stored_adapters_reads_no_weights_but_the_pinned_one(tiered: Server) -> None:
    assert httpx.get(f"{tiered.url}/readyz").json()["adapters"] == len(TASKS)
    assert metric(tiered.url, "kronserve_adapter_loads_total", source="store") == 1  # task0000, pinned
    assert metric(tiered.url, "kronserve_tier_adapters", tier="host") == 1
    assert metric(tiered.url, "kronserve_tier_adapters", tier="device") == 1
    with KronserveClient(tiered.url) as client:
        listed = [a.task for a in client.iter_adapters(page_size=150)]
        assert listed == TASKS  # three pages, in order, nothing twice
        cold = client.get_adapter("task0399", residency=True).extra["residency"]
        assert cold["tier"] == "store" and not cold["pinned"] and cold["bytes"] > 0
    page = httpx.get(f"{tiered.url}/v1/adapters", params={"limit": 2, "after": "task0100"})
    assert [a["task"] for a in page.json()] == ["task0101", "task0102"]
    assert all("residency" not in a and "base_model" in a for a in page.json())  # live state only when asked
    assert "residency" not in httpx.get(f"{tiered.url}/v1/adapters/task0101").json()
    assert page.headers["x-next-after"] == "task0102" and 'rel="next"' in page.headers["link"]
    assert "x-next-after" not in httpx.get(f"{tiered.url}/v1/adapters", params={"after": "task0398"}).headers


def test_cycling_over_many_tasks_under_a_three_adapter_budget_answers_each_as_alone(tiered: Server, catalogue) -> None:
    _, size, answers = catalogue
    asked = [task for task in TASKS[1:30] for _ in range(3)]  # 29 tasks, each thrice: hits, misses, evictions

    def ask(task: str) -> tuple[str, int, list[float]]:
        r = score(tiered.url, task)
        return task, r.status_code, r.json().get("scores", [])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, asked))
    for task, status, scores in results:
        assert status == 200 and scores == [pytest.approx(answers[TASKS.index(task) % DISTINCT], abs=1e-4)], task
    for tier in ("host", "device"):
        assert metric(tiered.url, "kronserve_tier_evictions_total", tier=tier) > 0
        assert metric(tiered.url, "kronserve_tier_misses_total", tier=tier) > 0
    assert metric(tiered.url, "kronserve_tier_hits_total", tier="device") > 0
    assert metric(tiered.url, "kronserve_tier_bytes", tier="device") <= 3 * size
    pinned = httpx.get(f"{tiered.url}/v1/adapters/task0000", params={"residency": True}).json()["residency"]
    assert pinned == {"tier": "device", "pinned": True, "bytes": size}  # never evicted meanwhile


def test_pins_are_refused_beyond_the_budget_and_undone_on_request(tiered: Server, catalogue) -> None:
    _, size, answers = catalogue
    for task in ("task0001", "task0002"):  # with task0000: three pinned, the whole device budget
        r = httpx.put(f"{tiered.url}/v1/adapters/{task}/pin")
        assert r.status_code == 200 and r.json()["residency"] == {"tier": "device", "pinned": True, "bytes": size}
    refused = httpx.put(f"{tiered.url}/v1/adapters/task0003/pin")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "pin_refused"
    assert "device budget" in refused.json()["error"]["message"]
    r = score(tiered.url, "task0003")
    assert r.json()["scores"] == [pytest.approx(answers[3], abs=1e-4)]  # over budget for one request, not refused
    assert httpx.delete(f"{tiered.url}/v1/adapters/task0002/pin").json()["residency"]["pinned"] is False
    assert httpx.get(f"{tiered.url}/v1/adapters/missing/pin").status_code in (404, 405)
    assert httpx.put(f"{tiered.url}/v1/adapters/missing/pin").status_code == 404
    data = (tiered.store / "task0004").glob("v*.safetensors").__next__().read_bytes()
    up = upload(f"{tiered.url}", "fresh", data)
    assert up.status_code == 201
    pinned_upload = httpx.put(
        f"{tiered.url}/v1/adapters/fresh2", params={"pin": True}, files={"file": ("a.safetensors", data)}
    )
    assert pinned_upload.status_code == 201 and pinned_upload.json()["residency"]["pinned"] is True
    for task in ("task0001", "fresh2"):
        assert httpx.delete(f"{tiered.url}/v1/adapters/{task}/pin").status_code == 200
